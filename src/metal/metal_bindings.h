// Python bindings of aotc's Metal launch primitive. The extension's main file calls
// aotc_register_metal(m) under #ifdef AOTC_WITH_METAL (defined, with src/metal/*.cpp added, on
// Apple platforms by the top-level CMakeLists.txt).
#pragma once

#include <nanobind/nanobind.h>

// Adds MetalProgram, metal_program, metal_launch, metal_max_threads and metal_architecture.
void aotc_register_metal(nanobind::module_& m);
