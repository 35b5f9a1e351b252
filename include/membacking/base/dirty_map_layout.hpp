/**
 * @file base/dirty_map_layout.hpp
 * Layer: base.
 *
 * DirtyMapLayout: how a dirty map records pages. Here, below both of its users, so that the
 * access layer's DirtyBitmap and the ipc layer's hello (WireDirtyLayout, ipc/protocol.hpp, which
 * converts to and from it in one place) name the same type without the ipc layer including the
 * access layer.
 */
#pragma once

#include <cstdint>

namespace membacking {

/// How a DirtyBitmap records pages: `bits`, one bit per page (the default: 2 MiB for a 64 GiB
/// guest; a mark is a load, a test and, the first time, a `lock or`), or `bytes`, one byte per
/// page (8x the memory; a mark is one plain store: access/dirty_byte_map.hpp).
enum class DirtyMapLayout : std::uint8_t { bits, bytes };

} // namespace membacking
