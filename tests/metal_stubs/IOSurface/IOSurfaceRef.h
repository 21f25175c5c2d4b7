// Stand-in for Apple's <IOSurface/IOSurfaceRef.h>.
#pragma once
typedef struct __IOSurface* IOSurfaceRef;
