/**
 * VcpuGate: holds one vCPU thread out of KVM_RUN on demand. It is what a VMM gives the guest
 * memory manager as a partition's quiesce hook (membacking/manager/quiesce_hook.hpp): hook()
 * returns {hold, release}.
 *
 * The vCPU thread calls run() instead of KvmVm::run(). hold(), from any other thread (or from
 * the vCPU thread between two run() calls), returns once the vCPU thread is outside KVM_RUN and
 * keeps it out until release(). The kick is the usual one (QEMU, cloud-hypervisor): set
 * kvm_run.immediate_exit, then signal the vCPU thread. A signal that lands just before the
 * thread enters KVM_RUN is not lost, because immediate_exit makes that KVM_RUN return EINTR at
 * once. The kick's EINTR is absorbed by run(): its caller sees only the guest's own exits.
 *
 * stop() ends the vCPU thread's run() calls for good (they return Exit::Kind::interrupted).
 *
 * Not part of the library: vCPUs are the VMM's business; this is example/test support.
 */
#pragma once

#include <membacking/manager/quiesce_hook.hpp>

#include "kvm_vcpu.hpp"

#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <mutex>
#include <pthread.h>
#include <utility>

namespace membacking::example {

class VcpuGate {
public:
    /// The signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing).
    static constexpr int kick_signal = SIGUSR1;

    explicit VcpuGate(KvmVm& vm) : vm_(vm)
    {
        static const bool installed = [] {
            struct sigaction sa {};
            sa.sa_handler = [](int) {}; // no SA_RESTART: KVM_RUN returns EINTR
            sigemptyset(&sa.sa_mask);
            ::sigaction(kick_signal, &sa, nullptr);
            return true;
        }();
        (void)installed;
    }
    VcpuGate(const VcpuGate&) = delete;
    VcpuGate& operator=(const VcpuGate&) = delete;

    /// The vCPU thread: waits while the gate is held, then runs the vCPU until the guest exits.
    /// A kick sends it back to waiting; it returns the first exit that is not a kick.
    KvmVm::Exit run()
    {
        // A kick must reach KVM_RUN: the signal may come blocked from whoever started us.
        static thread_local const bool unblocked = [] {
            sigset_t set;
            sigemptyset(&set);
            sigaddset(&set, kick_signal);
            return ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr) == 0;
        }();
        (void)unblocked;
        for (;;) {
            {
                std::unique_lock lock(mutex_);
                changed_.wait(lock, [&] { return !held_ || stopped_; });
                if (stopped_)
                    return KvmVm::Exit{KvmVm::Exit::Kind::interrupted};
                running_ = true;
                thread_ = ::pthread_self();
            }
            const KvmVm::Exit e = vm_.run();
            std::lock_guard lock(mutex_);
            running_ = false;
            changed_.notify_all();
            const bool ours = std::exchange(kicked_, false);
            if (e.kind != KvmVm::Exit::Kind::interrupted || !ours)
                return e; // (a kick that met a guest exit is spent too)
            // Our kick: wait for the release.
        }
    }

    /// Returns once the vCPU thread is out of KVM_RUN; it stays out until release().
    void hold()
    {
        std::unique_lock lock(mutex_);
        held_ = true;
        kick(lock);
    }

    /// Lets the vCPU thread run again.
    void release()
    {
        std::lock_guard lock(mutex_);
        held_ = false;
        changed_.notify_all();
    }

    /// Ends the vCPU thread's run() calls (this one and every later one).
    void stop()
    {
        std::unique_lock lock(mutex_);
        stopped_ = true;
        kick(lock);
        changed_.notify_all();
    }

    /// The quiesce hook for GuestMemoryManager::attach_partition.
    QuiesceHook hook()
    {
        return {[this] { hold(); }, [this] { release(); }};
    }

    /// Whether the vCPU thread is inside (or about to enter) KVM_RUN now.
    [[nodiscard]] bool running() const
    {
        std::lock_guard lock(mutex_);
        return running_;
    }
    /// How many times hold() or stop() had to kick the vCPU out of KVM_RUN.
    [[nodiscard]] std::uint64_t kicks() const
    {
        std::lock_guard lock(mutex_);
        return kicks_;
    }

private:
    void kick(std::unique_lock<std::mutex>& lock)
    {
        if (!running_)
            return;
        vm_.set_immediate_exit(true);
        kicked_ = true;
        ++kicks_;
        ::pthread_kill(thread_, kick_signal);
        changed_.wait(lock, [&] { return !running_; });
        vm_.set_immediate_exit(false);
    }

    KvmVm& vm_;
    mutable std::mutex mutex_;
    std::condition_variable changed_;
    bool held_ = false;
    bool stopped_ = false;
    bool running_ = false; ///< the vCPU thread is in, or about to enter, KVM_RUN
    bool kicked_ = false;  ///< the next EINTR is ours
    pthread_t thread_{};
    std::uint64_t kicks_ = 0;
};

} // namespace membacking::example
