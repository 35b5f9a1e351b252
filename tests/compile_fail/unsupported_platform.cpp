// A platform that is neither Linux nor Windows: fwd.hpp stops at an #error that says so, rather
// than a missing-type error deep in a template. (The build's compiler targets Linux: the case
// hides that from base/config.hpp, the one reader of platform macros.)
// expect: membacking: unsupported platform (Linux and Windows only): no VA policy for it
#undef __linux__
#undef __linux
#undef linux
#undef __gnu_linux__
#include <membacking/fwd.hpp>
