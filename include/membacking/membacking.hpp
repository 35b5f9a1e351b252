/**
 * @file membacking.hpp
 * The aggregator: every public header of the library, and the default compositions (fwd.hpp).
 */
#pragma once

#include <membacking/base/align.hpp>
#include <membacking/base/config.hpp>
#include <membacking/base/memory_range.hpp>
#include <membacking/base/memory_size.hpp>
#include <membacking/base/params.hpp>
#include <membacking/base/result.hpp>
#include <membacking/fwd.hpp>
#include <membacking/guest_memory.hpp>
#include <membacking/manager/builder.hpp>
#include <membacking/manager/client.hpp>
#include <membacking/manager/device_memory.hpp>
#include <membacking/manager/errors.hpp>
#include <membacking/manager/guest_memory_manager.hpp>
#include <membacking/manager/memory_map.hpp>
#include <membacking/manager/ram_backing_request.hpp>
#include <membacking/manager/ram_visibility.hpp>
#include <membacking/manager/shared_backing.hpp>
#include <membacking/manager/types.hpp>
#include <membacking/mapping/mapping_manager.hpp>
#include <membacking/partition/mock.hpp>
#include <membacking/partition/partition_mapper.hpp>
#include <membacking/region/mapping.hpp>
#include <membacking/region/mapping_list.hpp>
#include <membacking/region/nested_priority.hpp>
#include <membacking/region/region_manager.hpp>
#include <membacking/va/mappable.hpp>
#include <membacking/va/va_policy.hpp>

#if MEMBACKING_OS_LINUX
#    include <membacking/os/linux.hpp>
#    include <membacking/partition/kvm.hpp>
#    include <membacking/va/linux_mmap.hpp>
#elif MEMBACKING_OS_WINDOWS
#    include <membacking/os/windows.hpp>
#    include <membacking/os/winhvplatform.hpp>
#    include <membacking/partition/whp.hpp>
#    include <membacking/va/windows_placeholder.hpp>
#endif
