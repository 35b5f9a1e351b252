// Links one translation unit per public header into one program: each header compiles on its own
// (with our warnings as errors), and inline definitions shared by all of them link (ODR).
#include <cstdio>

int main()
{
    std::puts("every public header compiled on its own and linked together");
    return 0;
}
