// The Catch2 entry point for moetrain_tests (one test binary; CTest runs each case on its own).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
