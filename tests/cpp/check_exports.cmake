# cmake -DLIB=libopenelm_rt.so -DNM=nm -DHEADER=openelm_rt.h -P check_exports.cmake
# Fails unless the library's exported symbols are exactly the functions the header
# declares: nothing of the C++ core leaks, and nothing declared is missing.
execute_process(COMMAND ${NM} -D --defined-only ${LIB} OUTPUT_VARIABLE nm_out RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${NM} -D failed on ${LIB}")
endif()
string(REGEX MATCHALL "[0-9a-fA-F]+ [TDBRVWiu] [A-Za-z_][A-Za-z0-9_@.]*" exported "${nm_out}")
list(TRANSFORM exported REPLACE "^[0-9a-fA-F]+ [A-Za-z] " "")
file(READ ${HEADER} header)
string(REGEX MATCHALL "\nOELM_API [^;(]*\\(" declared "${header}")
list(TRANSFORM declared REPLACE ".*[ *]([a-z_0-9]+)\\($" "\\1")
list(SORT exported)
list(SORT declared)
if(NOT exported STREQUAL declared)
  set(extra ${exported})
  list(REMOVE_ITEM extra ${declared})
  set(missing ${declared})
  list(REMOVE_ITEM missing ${exported})
  message(FATAL_ERROR "exported symbols differ from the header: exported but not declared: [${extra}]; "
                      "declared but not exported: [${missing}]")
endif()
list(LENGTH exported n)
message(STATUS "${n} exported symbols, all declared in the header")
