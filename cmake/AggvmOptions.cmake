# Warnings, sanitizers and helpers shared by every target of the project.
set(AGGVM_WARNINGS -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wcast-align
    -Wunused -Woverloaded-virtual -Wnull-dereference -Wformat=2 -Wimplicit-fallthrough)
if(AGGVM_WERROR)
  list(APPEND AGGVM_WARNINGS -Werror)
endif()

if(AGGVM_FUZZ)
  # Instrument every library for coverage (not only the fuzz targets' own sources), so the fuzzer sees the edges of
  # the code it drives; the fuzz targets themselves link libFuzzer's main.
  add_compile_options(-fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer)
  add_link_options(-fsanitize=address,undefined)
endif()

if(AGGVM_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
endif()

# aggvm_target_defaults(<target>): warnings + include root for a project target.
function(aggvm_target_defaults target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${AGGVM_WARNINGS}>)
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR})
endfunction()

# aggvm_test(<name> SOURCES ... LIBS ... [LABELS ...]): a GoogleTest binary registered with ctest.
function(aggvm_test name)
  cmake_parse_arguments(T "" "TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  aggvm_target_defaults(${name})
  target_link_libraries(${name} PRIVATE ${T_LIBS} aggvm_test_support GTest::gtest GTest::gmock GTest::gtest_main)
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60
    PROPERTIES TIMEOUT ${T_TIMEOUT} LABELS "${T_LABELS}")
endfunction()

# aggvm_fuzz_target(<name> SOURCES ... LIBS ...): a libFuzzer target defining LLVMFuzzerTestOneInput.
#  - AGGVM_FUZZ=ON (clang): built as build-fuzz/fuzz/fuzz_<name> with -fsanitize=fuzzer,address,undefined;
#    scripts/test.sh runs each for a bounded time, seeded from fuzz/corpus/<name>/.
#  - otherwise: linked with fuzz/replay_main.cc into a ctest test that replays the corpus and a fixed-seed stream of
#    random and mutated inputs, so every build exercises the decoder on hostile bytes.
function(aggvm_fuzz_target name)
  cmake_parse_arguments(F "" "" "SOURCES;LIBS" ${ARGN})
  if(AGGVM_FUZZ)
    add_executable(fuzz_${name} ${F_SOURCES})
    aggvm_target_defaults(fuzz_${name})
    target_compile_options(fuzz_${name} PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_options(fuzz_${name} PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_libraries(fuzz_${name} PRIVATE ${F_LIBS})
    set_target_properties(fuzz_${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/fuzz)
    add_dependencies(fuzz_all fuzz_${name})
  else()
    add_executable(fuzz_replay_${name} ${F_SOURCES} ${PROJECT_SOURCE_DIR}/fuzz/replay_main.cc)
    aggvm_target_defaults(fuzz_replay_${name})
    target_link_libraries(fuzz_replay_${name} PRIVATE ${F_LIBS})
    add_test(NAME fuzz_replay.${name}
             COMMAND fuzz_replay_${name} ${PROJECT_SOURCE_DIR}/fuzz/corpus/${name})
    set_tests_properties(fuzz_replay.${name} PROPERTIES TIMEOUT 300 LABELS fuzz)
  endif()
endfunction()
