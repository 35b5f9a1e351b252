// What the stand-in WinHvPlatform.dll (whp_standin.cpp) records, shared with the tests that read
// it back. Plain C layout: it crosses a DLL boundary.
#pragma once

#include <cstdint>

enum StandinOp : std::uint32_t { standin_map = 1, standin_unmap = 2, standin_advise = 3 };

struct StandinCall {
    std::uint32_t op;
    void* partition;
    void* source;         ///< map: the host VA
    std::uint64_t gpa;    ///< the (first) range's GPA
    std::uint64_t size;   ///< its size
    std::uint32_t flags;  ///< map: WHV_MAP_GPA_RANGE_FLAGS
    std::uint32_t advice; ///< advise: the code (0 populate, 1 pin, 2 unpin); mapped(): pinned
    std::uint32_t populate_flags;  ///< advise(populate): the flags word
    std::uint32_t populate_access; ///< advise(populate): the access type
    long result;                   ///< the HRESULT returned
};

struct StandinRange {
    std::uint64_t guest_address;
    std::uint64_t size_in_bytes;
};
