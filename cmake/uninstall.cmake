# Removes what an install put in place, from the list CMake wrote then.
#
#   cmake [-DMANIFEST=<build>/install_manifest.txt] -P cmake/uninstall.cmake
#
# (`make uninstall` passes the list `make install` kept; the CMake target
# `uninstall` passes the build's install_manifest.txt, the last install
# from that build.) Each file and link is removed; then the directories
# only libcaller uses (lib/cmake/caller, share/jupyter/kernels/caller) if
# they are empty. Other directories stay.
if(NOT DEFINED MANIFEST)
  set(MANIFEST "${CMAKE_CURRENT_BINARY_DIR}/install_manifest.txt")
endif()
if(NOT EXISTS "${MANIFEST}")
  message(FATAL_ERROR "uninstall: no ${MANIFEST}: nothing was installed from this build")
endif()
file(STRINGS "${MANIFEST}" _files)
set(_dirs "")
foreach(_f IN LISTS _files)
  if(EXISTS "${_f}" OR IS_SYMLINK "${_f}")
    message(STATUS "Removing: ${_f}")
    file(REMOVE "${_f}")
  endif()
  get_filename_component(_d "${_f}" DIRECTORY)
  get_filename_component(_n "${_d}" NAME)
  if(_n STREQUAL "caller")
    list(APPEND _dirs "${_d}")
  endif()
endforeach()
list(REMOVE_DUPLICATES _dirs)
foreach(_d IN LISTS _dirs)
  file(GLOB _left "${_d}/*")
  if(IS_DIRECTORY "${_d}" AND NOT _left)
    message(STATUS "Removing: ${_d}")
    file(REMOVE_RECURSE "${_d}")
  endif()
endforeach()
