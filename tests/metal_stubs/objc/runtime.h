// Stand-in for Apple's <objc/runtime.h>: only what metal_cpp names (type checking on Linux).
#pragma once
typedef struct objc_class* Class;
struct objc_object { Class isa; };
typedef struct objc_object* id;
typedef struct objc_selector* SEL;
typedef struct objc_object Protocol;
extern "C" Class objc_lookUpClass(const char* name);
extern "C" Protocol* objc_getProtocol(const char* name);
extern "C" SEL sel_registerName(const char* name);
