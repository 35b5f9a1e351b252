/**
 * @file manager/memory_map.hpp
 * Layer: manager (includes base/, region/, manager/types.hpp).
 *
 * MemoryMap: a snapshot of the live state (every region with its range, priority, type, params,
 * whether it is visible, and its mappings; the attached partitions; the VA mappers), rendered as
 * text in the spirit of QEMU's `info mtree` (nested regions indented under the region that
 * contains them, ends inclusive) or as JSON for tools.
 *
 * Mappable objects are named "object#N" in order of first appearance, so two regions over the
 * same memfd show the same name.
 *
 * Lookups (find_region by name, region_at and mapping_at by GPA) return pointers into the map,
 * so they exist only on an lvalue: `manager.memory_map().find_region("ram")` does not compile,
 * because the temporary, and the pointer into it, would be gone at the end of the statement.
 * Keep the map in a variable: `const MemoryMap map = manager.memory_map();`.
 */
#pragma once

#include <membacking/base/memory_range.hpp>
#include <membacking/base/params.hpp>
#include <membacking/base/units.hpp>
#include <membacking/manager/types.hpp>
#include <membacking/region/region_id.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace membacking {

struct MemoryMap {
    struct Mapping {
        MemoryRange gpa; ///< absolute
        bool writable = false;
        bool private_memory = false;
        std::uintptr_t object = 0; ///< Mappable identity (0 for private memory)
        std::uint64_t file_offset = 0;
    };
    struct Region {
        RegionId id;
        std::string name;
        MemoryRange range;
        std::uint8_t priority = 0;
        MappingType type = MappingType::Ram;
        std::optional<MapParams> params; ///< nullopt: unmapped
        bool active = false;             ///< visible to the guest
        std::vector<Mapping> mappings;
    };
    struct Partition {
        PartitionId id;
        std::string type;
        Vtl vtl = Vtl::vtl0;
        std::uint64_t offset = 0;
        bool pin = false;
    };

    Gpa max_address;
    std::vector<Region> regions; ///< by start, then outer before inner
    std::vector<Partition> partitions;
    std::size_t va_mappers = 0;

    /// The region named `name` (the first in map order if several share it), or nullptr.
    [[nodiscard]] const Region* find_region(std::string_view name) const&
    {
        for (const Region& r : regions)
            if (r.name == name)
                return &r;
        return nullptr;
    }
    const Region* find_region(std::string_view name) const&& = delete;

    /// The region the guest sees at gpa (the active region containing it), or nullptr.
    [[nodiscard]] const Region* region_at(Gpa gpa) const&
    {
        for (const Region& r : regions)
            if (r.active && r.range.contains(gpa.value()))
                return &r;
        return nullptr;
    }
    const Region* region_at(Gpa gpa) const&& = delete;

    /// The mapping the guest sees at gpa, or nullptr (no visible region there, or a hole in it).
    [[nodiscard]] const Mapping* mapping_at(Gpa gpa) const&
    {
        const Region* r = region_at(gpa);
        if (r == nullptr)
            return nullptr;
        for (const Mapping& m : r->mappings)
            if (m.gpa.contains(gpa.value()))
                return &m;
        return nullptr;
    }
    const Mapping* mapping_at(Gpa gpa) const&& = delete;

    /// Orders regions by start address, enclosing (larger, then higher-priority) ones first.
    void sort()
    {
        std::ranges::sort(regions, std::less<>{}, [](const Region& r) {
            return std::tuple(r.range.start(), ~r.range.end(), 255 - r.priority, r.id);
        });
    }

    /// The text form: one line per region, indented under the regions that contain it.
    [[nodiscard]] std::string to_text() const
    {
        ObjectNames names;
        std::string out = "guest memory (max address " + to_string(max_address) + ", " +
                          std::to_string(va_mappers) + " VA mapper" + (va_mappers == 1 ? "" : "s") +
                          ")\n";
        std::vector<MemoryRange> open; // the chain of regions containing the current one
        for (const Region& r : regions) {
            while (!open.empty() && !open.back().contains(r.range))
                open.pop_back();
            const std::string indent(2 * (open.size() + 1), ' ');
            out += indent + span(r.range) + " (prio " + std::to_string(r.priority) + ", " +
                   std::string(to_string(r.type)) + ", " + params_text(r.params) + "): " + r.name +
                   (r.active ? " [active]" : "") + "\n";
            for (const Mapping& m : r.mappings)
                out += indent + "  " + span(m.gpa) + ": " + names.describe(m) +
                       (m.writable ? " rw" : " ro") + "\n";
            open.push_back(r.range);
        }
        out += "partitions:";
        if (partitions.empty())
            out += " none";
        out += "\n";
        for (const Partition& p : partitions)
            out += "  #" + std::to_string(p.id.value) + " " + p.type + " vtl" +
                   std::to_string(static_cast<int>(p.vtl)) + " at offset " +
                   MemoryRange::hex(p.offset) + (p.pin ? " (pinned)" : "") + "\n";
        return out;
    }

    /// The JSON form.
    [[nodiscard]] std::string to_json() const
    {
        ObjectNames names;
        std::string out = "{\"max_address\":" + std::to_string(max_address.value()) +
                          ",\"va_mappers\":" + std::to_string(va_mappers) + ",\"regions\":[";
        for (std::size_t i = 0; i < regions.size(); ++i) {
            const Region& r = regions[i];
            out += (i ? "," : "") + std::string("{\"id\":") + std::to_string(r.id.value) +
                   ",\"name\":" + quote(r.name) + ",\"start\":" + std::to_string(r.range.start()) +
                   ",\"end\":" + std::to_string(r.range.end()) +
                   ",\"priority\":" + std::to_string(r.priority) +
                   ",\"type\":" + quote(to_string(r.type)) +
                   ",\"mapped\":" + (r.params ? "true" : "false") +
                   ",\"active\":" + (r.active ? "true" : "false");
            if (r.params)
                out += ",\"params\":{\"writable\":" + boolean(r.params->writable) +
                       ",\"executable\":" + boolean(r.params->executable) +
                       ",\"prefetch\":" + boolean(r.params->prefetch) + "}";
            out += ",\"mappings\":[";
            for (std::size_t j = 0; j < r.mappings.size(); ++j) {
                const Mapping& m = r.mappings[j];
                out += (j ? "," : "") + std::string("{\"start\":") + std::to_string(m.gpa.start()) +
                       ",\"end\":" + std::to_string(m.gpa.end()) +
                       ",\"writable\":" + boolean(m.writable) +
                       ",\"backing\":" + quote(m.private_memory ? "private" : names.name(m.object));
                if (!m.private_memory)
                    out += ",\"file_offset\":" + std::to_string(m.file_offset);
                out += "}";
            }
            out += "]}";
        }
        out += "],\"partitions\":[";
        for (std::size_t i = 0; i < partitions.size(); ++i) {
            const Partition& p = partitions[i];
            out += (i ? "," : "") + std::string("{\"id\":") + std::to_string(p.id.value) +
                   ",\"type\":" + quote(p.type) +
                   ",\"vtl\":" + std::to_string(static_cast<int>(p.vtl)) +
                   ",\"offset\":" + std::to_string(p.offset) + ",\"pin\":" + boolean(p.pin) + "}";
        }
        return out + "]}";
    }

private:
    /// "object#1", "object#2"... by first appearance.
    class ObjectNames {
    public:
        std::string name(std::uintptr_t object)
        {
            auto [it, fresh] = names_.try_emplace(object, names_.size() + 1);
            (void)fresh;
            return "object#" + std::to_string(it->second);
        }
        std::string describe(const Mapping& m)
        {
            return m.private_memory ? std::string("private memory")
                                    : name(m.object) + " +" + MemoryRange::hex(m.file_offset);
        }

    private:
        std::map<std::uintptr_t, std::size_t> names_;
    };

    static std::string span(const MemoryRange& r)
    {
        char buf[48];
        (void)std::snprintf(buf, sizeof buf, "%016llx-%016llx",
                            static_cast<unsigned long long>(r.start()),
                            static_cast<unsigned long long>(r.end() - 1));
        return buf;
    }
    static std::string params_text(const std::optional<MapParams>& p)
    {
        if (!p)
            return "unmapped";
        std::string s = "r";
        s += p->writable ? "w" : "-";
        s += p->executable ? "x" : "-";
        return p->prefetch ? s + " prefetch" : s;
    }
    static std::string boolean(bool b) { return b ? "true" : "false"; }
    static std::string quote(std::string_view s)
    {
        std::string out = "\"";
        for (char c : s) {
            if (c == '"' || c == '\\') {
                out += '\\';
                out += c;
            } else if (static_cast<unsigned char>(c) < 0x20) {
                char buf[8];
                (void)std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
                out += buf;
            } else {
                out += c;
            }
        }
        return out + "\"";
    }
};

} // namespace membacking
