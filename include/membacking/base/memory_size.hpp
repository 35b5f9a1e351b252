/**
 * @file base/memory_size.hpp
 * Layer: base.
 *
 * MemorySize: a byte count printed the way the builder's messages print it: the largest of TB,
 * GB, MB, KB (powers of 1024) that divides it exactly, else bytes. 257 MiB is "257 MB", 1 GiB is
 * "1 GB", 0 is "0 bytes", 4097 is "4097 bytes".
 */
#pragma once

#include <cstdint>
#include <ostream>
#include <string>

namespace membacking {

struct MemorySize {
    std::uint64_t bytes = 0;

    [[nodiscard]] std::string to_string() const
    {
        struct Unit {
            std::uint64_t size;
            const char* name;
        };
        static constexpr Unit units[] = {{std::uint64_t{1} << 40, "TB"},
                                         {std::uint64_t{1} << 30, "GB"},
                                         {std::uint64_t{1} << 20, "MB"},
                                         {std::uint64_t{1} << 10, "KB"}};
        if (bytes != 0)
            for (const Unit& u : units)
                if (bytes % u.size == 0)
                    return std::to_string(bytes / u.size) + " " + u.name;
        return std::to_string(bytes) + " bytes";
    }

    friend std::ostream& operator<<(std::ostream& os, MemorySize s) { return os << s.to_string(); }
};

} // namespace membacking
