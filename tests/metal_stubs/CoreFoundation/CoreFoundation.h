// Stand-in for Apple's <CoreFoundation/CoreFoundation.h>.
#pragma once
typedef double CFTimeInterval;
