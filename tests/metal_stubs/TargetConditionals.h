// Stand-in for Apple TargetConditionals.h: type check the macOS branch of metal_cpp.
#pragma once
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
