/**
 * HugetlbPool: makes sure the 2 MiB hugetlb pool has `pages` free pages for the lifetime of the
 * object, reserving them through /proc/sys/vm/nr_hugepages if it has to (needs root), and
 * putting the old setting back afterwards. ok() says whether the pool is there; tests that need
 * it exit 77 (skipped) when it is not, and say why.
 */
#pragma once

#include <cstdio>
#include <fstream>
#include <string>

namespace membacking::test {

class HugetlbPool {
public:
    explicit HugetlbPool(long pages)
    {
        original_ = read_long(nr_path);
        const long free_now = read_long(free_path);
        if (original_ < 0 || free_now < 0) {
            why_ = "this kernel has no 2 MiB hugetlb pool";
            return;
        }
        if (free_now >= pages) {
            ok_ = true;
            return;
        }
        if (!write_long(nr_path, original_ + (pages - free_now))) {
            why_ = "cannot raise /proc/sys/vm/nr_hugepages (not root?)";
            return;
        }
        changed_ = true;
        ok_ = read_long(free_path) >= pages;
        if (!ok_)
            why_ =
                "the kernel could not find memory for " + std::to_string(pages) + " hugetlb pages";
    }
    ~HugetlbPool()
    {
        if (changed_)
            write_long(nr_path, original_);
    }
    HugetlbPool(const HugetlbPool&) = delete;
    HugetlbPool& operator=(const HugetlbPool&) = delete;

    [[nodiscard]] bool ok() const { return ok_; }
    [[nodiscard]] const std::string& why() const { return why_; }
    static long free_pages() { return read_long(free_path); }

private:
    static constexpr const char* nr_path = "/proc/sys/vm/nr_hugepages";
    static constexpr const char* free_path =
        "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

    static long read_long(const char* path)
    {
        std::ifstream in(path);
        long v = -1;
        return (in >> v) ? v : -1;
    }
    static bool write_long(const char* path, long v)
    {
        std::ofstream out(path);
        out << v;
        out.flush();
        return static_cast<bool>(out);
    }

    long original_ = -1;
    bool changed_ = false;
    bool ok_ = false;
    std::string why_;
};

} // namespace membacking::test
