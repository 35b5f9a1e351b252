/**
 * @file manager/detail/shared_objects.hpp
 * Internal (namespace membacking::detail); layer: manager (includes base/, detail/, os/,
 * mapping/memory_piece.hpp, region/). The whole body is Linux-only.
 *
 * check_shared_objects(regions, change): the one decision of which objects may be handed to
 * another process (ipc/remote_listener.hpp, serve_process in manager/client.hpp).
 *
 * Why whole objects: a process given an fd can mmap any offset of the file it names (Linux has
 * no sub-range fds) and may keep the fd forever. So what the manager shares with a worker is
 * every object a piece of which it hands out, whole, with the permission of the fd sent. The
 * rule, for every object a change adds a piece of:
 * - Identity is the file, not the Mappable: fstat's (st_dev, st_ino). Two Mappables of one file
 *   (a dup'd fd, the file reopened) are one object, and their mappings cover it together.
 * - Every byte of the object (its size rounded up to a page) must be guest memory: covered by
 *   some mapping of some region of the region manager, mapped or not, visible or hidden (RAM
 *   under a PAM segment or a ROM is still guest RAM). The first byte range that is not is named
 *   in the error.
 * - The object must not be placed both read-only and writable by mappings (RegionMapping::
 *   writable, a DeviceMapping's protection): a worker with a writable fd could write the
 *   read-only part, and one with a read-only fd could not write what the guest writes. A region's
 *   own permission (mapped read-only, a PAM segment, a read-only cap) is the guest's view of the
 *   moment, not a placement: the pieces it makes read-only go out with read-only fds, but the
 *   object stays writable through the fds of its writable pieces.
 * Refusals are errc::conflict: the object is fine, the topology does not make it all guest
 * memory yet.
 *
 * When it runs: inside the control call, from a listener's apply(), while the region manager is
 * in the middle of the step. The region manager's mapping lists may not hold the mapping a step
 * is adding yet (add_mapping to a visible region calls the sink first), and still hold the
 * visible mappings a step is removing; so the coverage is the region manager's mappings, minus
 * the object ranges of the change's removed pieces, plus those of its added pieces. Removing a
 * removed piece's range can only refuse more (its bytes may still be mapped elsewhere), never
 * less. An added piece whose mapping the region does not hold yet counts as placed with the
 * piece's own permission (read-only if the region is placed read-only: again, only stricter).
 * Rollbacks are not checked: they restore what was accepted before.
 *
 * Not thread-safe by itself: call it under the manager's control lock.
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_OS_LINUX

#    include <membacking/base/align.hpp>
#    include <membacking/base/memory_range.hpp>
#    include <membacking/base/result.hpp>
#    include <membacking/detail/interval_map.hpp>
#    include <membacking/mapping/memory_piece.hpp>
#    include <membacking/os/linux.hpp>
#    include <membacking/region/mapping.hpp>
#    include <membacking/va/mappable.hpp>

#    include <cstdint>
#    include <map>
#    include <optional>
#    include <string>
#    include <sys/stat.h>
#    include <utility>
#    include <vector>

namespace membacking::detail {

/// The file an fd names: what a process given that fd can map.
struct ObjectFile {
    std::uint64_t dev = 0;
    std::uint64_t ino = 0;
    std::uint64_t size = 0; ///< st_size

    [[nodiscard]] bool same_file(const ObjectFile& other) const noexcept
    {
        return dev == other.dev && ino == other.ino;
    }
};

/// The files behind Mappables, each fstat'd once per check.
template <class Sys>
class ObjectFiles {
public:
    Result<ObjectFile> of(const Mappable& object)
    {
        if (auto it = known_.find(object.identity()); it != known_.end())
            return it->second;
        struct stat st {};
        if (Sys::fstat(object.native_handle(), &st) != 0)
            return os::last_error(
                [&] { return "fstat of object fd " + std::to_string(object.native_handle()); });
        const ObjectFile f{static_cast<std::uint64_t>(st.st_dev),
                           static_cast<std::uint64_t>(st.st_ino),
                           static_cast<std::uint64_t>(st.st_size)};
        known_.emplace(object.identity(), f);
        return f;
    }

private:
    std::map<std::uintptr_t, ObjectFile> known_;
};

/// "object fd 7 (inode 0x1234 on device 0x5, size 0x10000)".
[[nodiscard]] inline std::string describe_object(const Mappable& object, const ObjectFile& f)
{
    std::string out = "object fd ";
    out += std::to_string(object.native_handle());
    out += " (inode ";
    out += MemoryRange::hex(f.ino);
    out += " on device ";
    out += MemoryRange::hex(f.dev);
    out += ", size ";
    out += MemoryRange::hex(f.size);
    out += ")";
    return out;
}

/// Object offsets [offset, offset + size) of one placement.
struct ObjectSpan {
    MemoryRange range;
};
struct RangeOfSpan {
    MemoryRange operator()(const ObjectSpan& s) const noexcept { return s.range; }
};

/// The mapping-level permission of an added piece, if its region already holds the mapping
/// that makes it (same object at the same offset); nothing if the mapping is still pending.
template <class Regions>
[[nodiscard]] std::optional<bool> placed_writable(const Regions& regions, const MemoryPiece& p)
{
    const auto* r = regions.find(p.region);
    if (r == nullptr || !r->range.contains(p.gpa))
        return std::nullopt;
    const MemoryRange rel = p.gpa.shifted_down(r->range.start());
    std::optional<bool> out;
    r->mappings.for_each_overlapping(rel, [&](const RegionMapping& m) {
        if (m.range.contains(rel) && m.backing.object == p.object &&
            m.backing.file_offset + (rel.start() - m.range.start()) == p.offset.value())
            out = m.writable;
    });
    return out;
}

template <class Sys, class Regions>
[[nodiscard]] Result<void> check_one_object(const Regions& regions, const MemoryTableChange& change,
                                            const ObjectFile& file, const MemoryPiece& first,
                                            ObjectFiles<Sys>& files)
{
    IntervalMap<ObjectSpan, RangeOfSpan> covered;
    const auto slice = [](const ObjectSpan&, const MemoryRange& part) { return ObjectSpan{part}; };
    const auto cover = [&](const MemoryRange& r) {
        covered.punch(r, slice);
        covered.insert(ObjectSpan{r});
    };
    std::optional<MemoryRange> read_only_at;
    std::optional<MemoryRange> writable_at;
    const auto placed = [&](const MemoryRange& r, bool writable) {
        auto& at = writable ? writable_at : read_only_at;
        if (!at)
            at = r;
    };
    const auto is_this_file = [&](const Mappable& object) -> Result<bool> {
        if (object.empty())
            return false;
        auto f = files.of(object);
        if (!f)
            return std::move(f).error();
        return f->same_file(file);
    };
    const auto piece_span = [](const MemoryPiece& p) {
        return MemoryRange::valid_or_abort(p.offset.value(), p.offset.value() + p.gpa.size());
    };

    for (const auto& [id, region] : regions.regions())
        for (const auto& [start, m] : region.mappings) {
            auto mine = is_this_file(m.backing.object);
            if (!mine)
                return std::move(mine).error();
            if (!*mine)
                continue;
            const MemoryRange span = MemoryRange::valid_or_abort(
                m.backing.file_offset, m.backing.file_offset + m.range.size());
            cover(span);
            placed(span, m.writable);
        }
    for (const MemoryPiece& p : change.removed) {
        auto mine = is_this_file(p.object);
        if (!mine)
            return std::move(mine).error();
        if (*mine)
            covered.punch(piece_span(p), slice);
    }
    for (const MemoryPiece& p : change.added) {
        auto mine = is_this_file(p.object);
        if (!mine)
            return std::move(mine).error();
        if (!*mine)
            continue;
        cover(piece_span(p));
        if (!placed_writable(regions, p))
            placed(piece_span(p), p.writable);
    }

    const std::uint64_t end = checked_align_up(file.size, page_size).value_or(file.size);
    const MemoryRange whole = MemoryRange::valid_or_abort(0, end);
    for (std::uint64_t at = 0; at < end;) {
        if (const ObjectSpan* s = covered.containing(at)) {
            at = s->range.end();
            continue;
        }
        const MemoryRange gap = covered.gap_around(at, whole).value_or(whole);
        std::string why = describe_object(first.object, file);
        why += ", behind guest memory at ";
        why += first.gpa.to_string();
        why += ", is not all guest memory: its bytes ";
        why += gap.to_string();
        why += " are in no mapping of any region, and a process given its fd could map them; "
               "map the whole object into the guest, or share only an object that holds guest "
               "memory alone";
        return make_error(errc::conflict, why);
    }
    if (read_only_at && writable_at) {
        std::string why = describe_object(first.object, file);
        why += ", behind guest memory at ";
        why += first.gpa.to_string();
        why += ", is placed read-only (its bytes ";
        why += read_only_at->to_string();
        why += ") and writable (";
        why += writable_at->to_string();
        why += ") by mappings: a process given a writable fd of it could write the read-only "
               "part; back the read-only part with an object of its own";
        return make_error(errc::conflict, why);
    }
    return {};
}

/// errc::conflict naming the first object that `change` adds a piece of and that may not be
/// handed to another process under `regions` (see the file comment); success otherwise.
template <class Sys, class Regions>
[[nodiscard]] Result<void> check_shared_objects(const Regions& regions,
                                                const MemoryTableChange& change)
{
    if (change.kind == MemoryTableChange::Kind::rollback)
        return {};
    ObjectFiles<Sys> files;
    struct Target {
        ObjectFile file;
        const MemoryPiece* piece; ///< the first added piece of it
    };
    std::vector<Target> targets;
    for (const MemoryPiece& p : change.added) {
        if (!p.shareable())
            continue; // private memory is refused by require_shareable
        auto f = files.of(p.object);
        if (!f)
            return std::move(f).error();
        bool seen = false;
        for (const Target& t : targets)
            seen = seen || t.file.same_file(*f);
        if (!seen)
            targets.push_back({*f, &p});
    }
    for (const Target& t : targets)
        MEMBACKING_TRY(check_one_object<Sys>(regions, change, t.file, *t.piece, files));
    return {};
}

} // namespace membacking::detail

#endif // MEMBACKING_OS_LINUX
