// Stand-in for Apple's <objc/message.h> (OBJC_OLD_DISPATCH_PROTOTYPES=0 signatures).
#pragma once
#include <objc/runtime.h>
extern "C" void objc_msgSend(void);
extern "C" void objc_msgSend_fpret(void);  // x86 only in the SDK; Linux type checks are x86_64
extern "C" void objc_msgSend_stret(void);
