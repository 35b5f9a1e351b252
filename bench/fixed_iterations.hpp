// Shared by the benchmark programs: MEMBACKING_BENCH_ITERATIONS=N runs every benchmark for exactly
// N iterations. Under callgrind, two runs with different N give the exact instruction count of one
// iteration (the difference of the totals over the difference of N), a figure the machine's noise
// cannot move; bench/count_instructions.sh does that.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <initializer_list>

namespace membacking::bench {

inline void fix_iterations(std::initializer_list<benchmark::internal::Benchmark*> all)
{
    const char* env = std::getenv("MEMBACKING_BENCH_ITERATIONS");
    if (env == nullptr)
        return;
    const long long n = std::atoll(env);
    if (n <= 0) {
        std::fprintf(stderr, "MEMBACKING_BENCH_ITERATIONS must be a positive count, not '%s'\n",
                     env);
        std::exit(1);
    }
    for (auto* b : all)
        b->Iterations(static_cast<benchmark::IterationCount>(n));
}

} // namespace membacking::bench
