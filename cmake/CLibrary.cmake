# libopenelm_rt: the C API over the core, and its install rules: the header, the
# library and the CMake package files, so that consumers write
#   find_package(openelm_rt 0.2 REQUIRED)
#   target_link_libraries(app PRIVATE openelm_rt::openelm_rt)
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

add_library(openelm_rt SHARED csrc/api/openelm_rt.cpp)
add_library(openelm_rt::openelm_rt ALIAS openelm_rt)
target_include_directories(openelm_rt PUBLIC
  $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/csrc/include>
  $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
target_link_libraries(openelm_rt PRIVATE openelm_rt_core)
target_compile_definitions(openelm_rt PRIVATE OPENELM_RT_BUILDING)
# Only what the header marks OELM_API is exported. While the version is 0.x the
# minor number is the ABI, hence SOVERSION 0.3 (libopenelm_rt.so.0.3).
set_target_properties(openelm_rt PROPERTIES
  CXX_VISIBILITY_PRESET hidden
  VISIBILITY_INLINES_HIDDEN ON
  VERSION ${PROJECT_VERSION}
  SOVERSION ${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR}
  EXPORT_NAME openelm_rt)
openelm_rt_set_warnings(openelm_rt)
# Visibility alone leaves the C++ standard library's template instantiations
# exported (libstdc++ declares namespace std visible); the version script keeps
# exactly the oelm_ functions. tests/cpp/check_exports.cmake checks the result.
if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
  target_link_options(openelm_rt PRIVATE "LINKER:--version-script=${CMAKE_CURRENT_SOURCE_DIR}/cmake/openelm_rt.map")
  set_property(TARGET openelm_rt APPEND PROPERTY LINK_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/cmake/openelm_rt.map)
endif()

install(TARGETS openelm_rt EXPORT openelm_rtTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(FILES csrc/include/openelm_rt/openelm_rt.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/openelm_rt)
set(_oelm_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/openelm_rt)
install(EXPORT openelm_rtTargets NAMESPACE openelm_rt:: DESTINATION ${_oelm_cmake_dir})
configure_package_config_file(cmake/openelm_rtConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/openelm_rtConfig.cmake INSTALL_DESTINATION ${_oelm_cmake_dir})
# 0.x: a different minor version is a different ABI.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/openelm_rtConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/openelm_rtConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/openelm_rtConfigVersion.cmake DESTINATION ${_oelm_cmake_dir})

if(OPENELM_RT_TESTS)
  enable_testing()
  add_subdirectory(tests/cpp)
endif()
