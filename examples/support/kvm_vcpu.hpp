/**
 * KvmVm: a KVM VM with one vCPU in flat 32-bit protected mode (no paging, 4 GiB segments), for
 * the example VMM, the KVM tests and the KVM benchmarks. The memory is the guest memory
 * manager's business: attach a KvmPartition built on vm_fd().
 *
 * run() executes until the guest halts or touches memory that no memslot backs (an MMIO exit),
 * under a watchdog, so a runaway guest fails instead of hanging.
 *
 * Not part of the library: vCPUs are the VMM's business; this is example/test support.
 */
#pragma once

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <linux/kvm.h>
#include <optional>
#include <string>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <unistd.h>
#include <utility>

namespace membacking::example {

class KvmVm {
public:
    struct Exit {
        enum class Kind { halt, mmio, interrupted, failed, other } kind = Kind::other;
        std::uint64_t address = 0; ///< MMIO: the guest physical address
        bool write = false;        ///< MMIO: a write
        std::uint32_t length = 0;  ///< MMIO: the access size
        std::uint64_t data = 0;    ///< MMIO write: the value written
        std::uint32_t reason = 0;  ///< KVM_EXIT_* for Kind::other
        int error = 0;             ///< errno for Kind::failed
    };

    /// Opens /dev/kvm and creates the VM and its vCPU, or says why it cannot.
    static std::optional<KvmVm> create(std::string& why)
    {
        KvmVm vm;
        vm.kvm_ = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
        if (vm.kvm_ < 0) {
            why = std::string("/dev/kvm: ") + std::strerror(errno);
            return std::nullopt;
        }
        if (::ioctl(vm.kvm_, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
            why = "unexpected KVM API version";
            return std::nullopt;
        }
        vm.vm_ = ::ioctl(vm.kvm_, KVM_CREATE_VM, 0);
        if (vm.vm_ < 0) {
            why = std::string("KVM_CREATE_VM: ") + std::strerror(errno);
            return std::nullopt;
        }
        vm.vcpu_ = ::ioctl(vm.vm_, KVM_CREATE_VCPU, 0);
        const int run_size = ::ioctl(vm.kvm_, KVM_GET_VCPU_MMAP_SIZE, 0);
        if (vm.vcpu_ < 0 || run_size <= 0) {
            why = std::string("KVM_CREATE_VCPU: ") + std::strerror(errno);
            return std::nullopt;
        }
        vm.run_size_ = static_cast<std::size_t>(run_size);
        void* run = ::mmap(nullptr, vm.run_size_, PROT_READ | PROT_WRITE, MAP_SHARED, vm.vcpu_, 0);
        if (run == MAP_FAILED) {
            why = std::string("mmap(kvm_run): ") + std::strerror(errno);
            return std::nullopt;
        }
        vm.run_ = static_cast<kvm_run*>(run);
        if (!vm.enter_protected_mode()) {
            why = std::string("KVM_SET_SREGS: ") + std::strerror(errno);
            return std::nullopt;
        }
        return vm;
    }

    KvmVm(KvmVm&& o) noexcept
        : kvm_(std::exchange(o.kvm_, -1)), vm_(std::exchange(o.vm_, -1)),
          vcpu_(std::exchange(o.vcpu_, -1)), run_(std::exchange(o.run_, nullptr)),
          run_size_(o.run_size_)
    {}
    KvmVm& operator=(KvmVm&&) = delete;
    KvmVm(const KvmVm&) = delete;
    KvmVm& operator=(const KvmVm&) = delete;
    ~KvmVm()
    {
        if (run_ != nullptr)
            ::munmap(run_, run_size_);
        for (int fd : {vcpu_, vm_, kvm_})
            if (fd >= 0)
                ::close(fd);
    }

    [[nodiscard]] int vm_fd() const { return vm_; }
    [[nodiscard]] int vcpu_fd() const { return vcpu_; }

    /// Points the vCPU at code (a guest physical address) with a fresh register file.
    bool start_at(std::uint32_t eip)
    {
        kvm_regs regs{};
        regs.rip = eip;
        regs.rflags = 0x2;
        regs.rsp = 0x8000;
        return ::ioctl(vcpu_, KVM_SET_REGS, &regs) == 0;
    }

    /// Runs until a halt, an MMIO access, or the watchdog (seconds) fires.
    Exit run(unsigned watchdog_seconds = 20)
    {
        arm_watchdog(watchdog_seconds);
        const int rc = ::ioctl(vcpu_, KVM_RUN, 0);
        const int err = errno;
        arm_watchdog(0);
        Exit e;
        if (rc < 0) {
            e.kind = err == EINTR ? Exit::Kind::interrupted : Exit::Kind::failed;
            e.error = err;
            return e;
        }
        e.reason = run_->exit_reason;
        if (run_->exit_reason == KVM_EXIT_HLT) {
            e.kind = Exit::Kind::halt;
        } else if (run_->exit_reason == KVM_EXIT_MMIO) {
            e.kind = Exit::Kind::mmio;
            e.address = run_->mmio.phys_addr;
            e.write = run_->mmio.is_write != 0;
            e.length = run_->mmio.len;
            std::memcpy(&e.data, run_->mmio.data, std::min<std::size_t>(e.length, 8));
        }
        return e;
    }

    /// The value an MMIO read returns to the guest when it runs next.
    void answer_mmio(std::uint64_t value) { std::memcpy(run_->mmio.data, &value, sizeof value); }

    /// Sets or clears kvm_run.immediate_exit: while it is set, KVM_RUN returns EINTR at once
    /// instead of entering the guest (how a vCPU is kicked without losing a signal that arrives
    /// just before KVM_RUN; see vcpu_gate.hpp). Any thread may call it.
    void set_immediate_exit(bool on)
    {
        std::atomic_ref<std::uint8_t>(run_->immediate_exit).store(on ? 1 : 0);
    }

    /// The guest's EAX (results the guest leaves in a register).
    [[nodiscard]] std::uint64_t eax() const
    {
        kvm_regs regs{};
        ::ioctl(vcpu_, KVM_GET_REGS, &regs);
        return regs.rax;
    }

private:
    KvmVm() = default;

    bool enter_protected_mode()
    {
        kvm_sregs sregs{};
        if (::ioctl(vcpu_, KVM_GET_SREGS, &sregs) != 0)
            return false;
        kvm_segment flat{};
        flat.base = 0;
        flat.limit = 0xffffffff;
        flat.present = 1;
        flat.dpl = 0;
        flat.db = 1;
        flat.s = 1;
        flat.l = 0;
        flat.g = 1;
        flat.selector = 0x10;
        flat.type = 3; // data, read/write, accessed
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = flat;
        flat.selector = 0x08;
        flat.type = 11; // code, execute/read, accessed
        sregs.cs = flat;
        sregs.cr0 |= 1; // protected mode, no paging
        return ::ioctl(vcpu_, KVM_SET_SREGS, &sregs) == 0;
    }

    static void arm_watchdog(unsigned seconds)
    {
        static const bool installed = [] {
            struct sigaction sa {};
            sa.sa_handler = [](int) {}; // only to make KVM_RUN return EINTR
            sigemptyset(&sa.sa_mask);
            ::sigaction(SIGALRM, &sa, nullptr);
            return true;
        }();
        (void)installed;
        itimerval t{};
        t.it_value.tv_sec = seconds;
        ::setitimer(ITIMER_REAL, &t, nullptr);
    }

    int kvm_ = -1;
    int vm_ = -1;
    int vcpu_ = -1;
    kvm_run* run_ = nullptr;
    std::size_t run_size_ = 0;
};

} // namespace membacking::example
