// A stand-in WinHvPlatform.dll for the WHP partition policy's tests (Wine has no Windows
// Hypervisor Platform). It exports the three entry points the policy resolves, with the real
// signatures, keeps the GPA map a hypervisor would keep (and rejects what WHP rejects: a map over
// a mapped range, an unmap or advice over a range that is not mapped), records every call in
// order, and can be told to fail the n-th call from now with a given HRESULT, changing nothing,
// or that call and every later one (a host whose resource keeps failing).
//
// The tests reach its controls through the same module handle (GetProcAddress of standin_*).
#include <windows.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "whp_standin.hpp"

namespace {

struct Mapped {
    std::uint64_t size;
    std::uint32_t flags;
    bool pinned;
};

std::mutex mutex;
std::vector<StandinCall> calls;
std::map<std::uint64_t, Mapped> mapped; // by GPA
std::uint64_t calls_seen = 0;
std::uint64_t fail_at = 0; // 0 = never
HRESULT fail_with = E_FAIL;
bool keep_failing = false; // every call from fail_at on fails

/// Counts the call; true if this one is to fail (recorded as failed).
bool should_fail(StandinCall& c)
{
    ++calls_seen;
    if (fail_at != 0 && (calls_seen == fail_at || (keep_failing && calls_seen > fail_at))) {
        if (!keep_failing)
            fail_at = 0;
        c.result = fail_with;
        calls.push_back(c);
        return true;
    }
    return false;
}

HRESULT finish(StandinCall& c, HRESULT hr)
{
    c.result = hr;
    calls.push_back(c);
    return hr;
}

bool overlaps(std::uint64_t gpa, std::uint64_t size)
{
    for (const auto& [start, m] : mapped)
        if (start < gpa + size && gpa < start + m.size)
            return true;
    return false;
}

/// True if [gpa, gpa+size) lies inside one mapped range.
Mapped* inside(std::uint64_t gpa, std::uint64_t size)
{
    auto it = mapped.upper_bound(gpa);
    if (it == mapped.begin())
        return nullptr;
    --it;
    return gpa + size <= it->first + it->second.size ? &it->second : nullptr;
}

} // namespace

extern "C" {

__declspec(dllexport) HRESULT WINAPI
    WHvMapGpaRange(void* partition, void* source, std::uint64_t gpa, std::uint64_t size,
                   std::uint32_t flags)
{
    std::lock_guard lock(mutex);
    StandinCall c{standin_map, partition, source, gpa, size, flags, 0, 0, 0, S_OK};
    if (should_fail(c))
        return fail_with;
    if (size == 0 || (gpa | size) % 4096 != 0 || overlaps(gpa, size))
        return finish(c, E_INVALIDARG);
    mapped.emplace(gpa, Mapped{size, flags, false});
    return finish(c, S_OK);
}

__declspec(dllexport) HRESULT WINAPI
    WHvUnmapGpaRange(void* partition, std::uint64_t gpa, std::uint64_t size)
{
    std::lock_guard lock(mutex);
    StandinCall c{standin_unmap, partition, nullptr, gpa, size, 0, 0, 0, 0, S_OK};
    if (should_fail(c))
        return fail_with;
    auto it = mapped.find(gpa);
    if (it == mapped.end() || it->second.size != size)
        return finish(c, E_INVALIDARG); // the tests' policy only unmaps whole ranges
    mapped.erase(it);
    return finish(c, S_OK);
}

__declspec(dllexport) HRESULT WINAPI
    WHvAdviseGpaRange(void* partition, const StandinRange* ranges, std::uint32_t count,
                      std::uint32_t advice, const void* buffer, std::uint32_t size)
{
    std::lock_guard lock(mutex);
    StandinCall c{standin_advise, partition, nullptr, 0, 0, 0, advice, 0, 0, S_OK};
    if (count == 1) {
        c.gpa = ranges[0].guest_address;
        c.size = ranges[0].size_in_bytes;
    }
    if (buffer != nullptr && size >= 8) {
        const auto* words = static_cast<const std::uint32_t*>(buffer);
        c.populate_flags = words[0];
        c.populate_access = words[1];
    }
    if (should_fail(c))
        return fail_with;
    if (count != 1 || advice > 2)
        return finish(c, E_INVALIDARG);
    Mapped* m = inside(c.gpa, c.size);
    if (m == nullptr)
        return finish(c, E_INVALIDARG);
    if (advice == 1)
        m->pinned = true;
    if (advice == 2)
        m->pinned = false;
    return finish(c, S_OK);
}

__declspec(dllexport) void standin_reset()
{
    std::lock_guard lock(mutex);
    calls.clear();
    mapped.clear();
    calls_seen = 0;
    fail_at = 0;
    keep_failing = false;
}

__declspec(dllexport) void standin_fail_nth_call(std::uint64_t n, HRESULT hr)
{
    std::lock_guard lock(mutex);
    fail_at = calls_seen + n;
    fail_with = hr;
    keep_failing = false;
}

/// The n-th call from now and every later one fail with hr, until n = 0 stops it.
__declspec(dllexport) void standin_fail_from_nth_call(std::uint64_t n, HRESULT hr)
{
    std::lock_guard lock(mutex);
    fail_at = n == 0 ? 0 : calls_seen + n;
    fail_with = hr;
    keep_failing = n != 0;
}

__declspec(dllexport) std::uint32_t standin_calls(StandinCall* out, std::uint32_t max)
{
    std::lock_guard lock(mutex);
    std::uint32_t n = 0;
    for (; n < max && n < calls.size(); ++n)
        out[n] = calls[n];
    return static_cast<std::uint32_t>(calls.size());
}

__declspec(dllexport) std::uint32_t standin_mapped(StandinCall* out, std::uint32_t max)
{
    std::lock_guard lock(mutex);
    std::uint32_t n = 0;
    for (auto it = mapped.begin(); it != mapped.end() && n < max; ++it, ++n)
        out[n] = StandinCall{standin_map,
                             nullptr,
                             nullptr,
                             it->first,
                             it->second.size,
                             it->second.flags,
                             it->second.pinned ? 1U : 0U,
                             0,
                             0,
                             S_OK};
    return static_cast<std::uint32_t>(mapped.size());
}

} // extern "C"
