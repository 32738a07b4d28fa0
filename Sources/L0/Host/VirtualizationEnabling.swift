/// When virtualization is on, CPU by CPU: KVM's enabling after Sean Christopherson's rework
/// (seeds/000, 001). One usage count, `kvm_usage_count`, protected by the host's one lock, with
/// one rule: an online CPU has virtualization enabled iff the count is > 0 (outside suspend).
///
/// Every user holds one reference: each VM, and with `enable_virt_at_load` the loaded host
/// itself, as KVM's `kvm_init` takes a reference that `kvm_exit` drops. The 0 -> 1 transition
/// enables every online CPU in order, as `cpuhp_setup_state` runs the online callback on each CPU
/// in turn (serialized, which is why it costs first-VM latency); 1 -> 0 disables them all.
/// Hotplug and suspend/resume are the callbacks KVM registers (`kvm_online_cpu`,
/// `kvm_offline_cpu`, `kvm_suspend`, `kvm_resume`) and follow the same rule.
struct VirtualizationEnabling {
    var cpus: HostCPUs
    private(set) var usageCount = 0
    private(set) var suspended = false

    init(cpus: HostCPUs) { self.cpus = cpus }

    /// Takes a reference (`kvm_enable_virtualization`). On the first one, enables every online
    /// CPU; if CPU k fails, the CPUs enabled before it are disabled again (cpuhp's rollback), the
    /// count stays 0, and the error names CPU k.
    mutating func acquire() throws(HostError) {
        guard !suspended else { throw .suspended }
        if usageCount > 0 {
            usageCount += 1
            return
        }
        var enabledByThisAttempt: [Int] = []
        for cpu in cpus.online {
            do {
                try cpus.enable(cpu)
                enabledByThisAttempt.append(cpu)
            } catch {
                for done in enabledByThisAttempt.reversed() { cpus.disable(done) }
                throw error
            }
        }
        usageCount = 1
    }

    /// Drops a reference (`kvm_disable_virtualization`); the last one disables every CPU.
    mutating func release() {
        precondition(usageCount > 0, "virtualization usage count underflow")
        usageCount -= 1
        if usageCount == 0 && !suspended {
            for cpu in cpus.online where cpus.isEnabled(cpu) { cpus.disable(cpu) }
        }
    }

    /// `kvm_online_cpu`: the CPU comes online with virtualization enabled iff the count is > 0.
    /// If enabling fails the CPU does not come online, as cpuhp undoes a failed bring-up.
    mutating func online(_ cpu: Int) throws(HostError) {
        guard !suspended else { throw .suspended }
        guard !cpus.isOnline(cpu) else { return }
        cpus.setOnline(cpu, true)
        guard usageCount > 0 else { return }
        do {
            try cpus.enable(cpu)
        } catch {
            cpus.setOnline(cpu, false)
            throw error
        }
    }

    /// `kvm_offline_cpu`: a CPU going offline leaves virtualization behind (VMXOFF on it).
    mutating func offline(_ cpu: Int) throws(HostError) {
        guard !suspended else { throw .suspended }
        guard cpus.isOnline(cpu) else { return }
        guard cpus.online.count > 1 else { throw .lastOnlineCPU(cpu) }
        if cpus.isEnabled(cpu) { cpus.disable(cpu) }
        cpus.setOnline(cpu, false)
    }

    /// `kvm_suspend`: virtualization is off on every CPU across suspend, whatever the count. VMs
    /// and the count survive; nothing else runs until resume.
    mutating func suspend() {
        guard !suspended else { return }
        for cpu in cpus.online where cpus.isEnabled(cpu) { cpus.disable(cpu) }
        suspended = true
    }

    /// `kvm_resume`: re-enables every online CPU if the count is > 0. A CPU whose enable fails
    /// is left offline (as a CPU that fails to come back from suspend) and returned, so the rule
    /// still holds for every online CPU.
    mutating func resume() -> Set<Int> {
        guard suspended else { return [] }
        suspended = false
        guard usageCount > 0 else { return [] }
        var leftOffline: Set<Int> = []
        for cpu in cpus.online {
            do throws(HostError) {
                try cpus.enable(cpu)
            } catch {
                cpus.setOnline(cpu, false)
                leftOffline.insert(cpu)
            }
        }
        return leftOffline
    }

    /// The rule this type keeps, for assertions: outside suspend, online CPUs are enabled iff
    /// the count is > 0, and offline CPUs never are.
    var invariantHolds: Bool {
        (0..<cpus.count).allSatisfy { cpu in
            let want = !suspended && cpus.isOnline(cpu) && usageCount > 0
            return cpus.isEnabled(cpu) == want
        }
    }
}
