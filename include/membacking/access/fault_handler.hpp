/**
 * @file access/fault_handler.hpp
 * Layer: access (includes base/ only).
 *
 * The fault handler behind the guarded primitives, one per OS, with one interface:
 * - struct FaultRecord: what the handler recorded about the last recovered fault on this thread
 *   (every OS has `address`, the first byte that could not be accessed or 0 if unknown, and
 *   `remaining`, RCX at the fault: what a bulk primitive had left to do);
 * - install_fault_handler(): idempotent, thread-safe, once per module;
 * - last_fault(): the record, valid right after a primitive returned false.
 *
 * Linux: a SIGSEGV/SIGBUS handler and a recovery table in an SHF_LINK_ORDER section
 * (access/signal_handler.hpp). Windows with MinGW: a vectored exception handler and a marker in
 * the instruction stream, because PE/COFF cannot tie a table entry to a COMDAT copy of inline code
 * (access/veh_handler.hpp explains why and how).
 */
#pragma once

#include <membacking/base/config.hpp>

#if MEMBACKING_HAS_GUARDED_ACCESS && MEMBACKING_OS_LINUX
#    include <membacking/access/signal_handler.hpp>
#elif MEMBACKING_HAS_GUARDED_ACCESS && MEMBACKING_OS_WINDOWS
#    include <membacking/access/veh_handler.hpp>
#endif
