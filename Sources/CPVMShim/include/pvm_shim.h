// The C view of the field's own headers, plus the few syscalls Swift's Glibc overlay lacks.
// This file wraps; it never redefines: exit reasons, uAPI structs and KVM hypercall codes come
// from linux-libc-dev exactly as installed.
#ifndef PVM_SHIM_H
#define PVM_SHIM_H

#include <errno.h>
#include <stdint.h>
#include <sys/types.h>
#include <linux/kvm.h>        // struct kvm_userspace_memory_region, kvm_cpuid_entry2, kvm_msr_entry, KVM_EXIT_*
#include <linux/kvm_para.h>   // KVM_HC_*, KVM_ENOSYS / KVM_EINVAL / KVM_EFAULT / KVM_E2BIG / KVM_EPERM
#include <asm/vmx.h>          // EXIT_REASON_*, VMX_EXIT_REASONS_FAILED_VMENTRY

// futex(2) on a 32-bit word in shared memory (not process-private: the word is in a memfd).
// Returns 0, or -errno (EAGAIN when *addr != expected, ETIMEDOUT on timeout).
int pvm_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns);
// Wakes up to `count` waiters; returns how many were woken, or -errno.
int pvm_futex_wake(uint32_t *addr, int count);
// futex_waitv(2) (Linux 5.16): sleeps until any of `count` shared 32-bit words is woken or no
// longer holds its expected value, or `timeout_ns` passes (relative, CLOCK_MONOTONIC). Returns
// the index of the woken word, or -errno (-EAGAIN: a word already differed; -ETIMEDOUT).
// At most PVM_FUTEX_WAITV_MAX words.
#define PVM_FUTEX_WAITV_MAX 128
int pvm_futex_waitv(uint32_t *const *addrs, const uint32_t *expected, int count, int64_t timeout_ns);

// memfd_create(2) with MFD_CLOEXEC | MFD_ALLOW_SEALING; returns the fd or -errno.
int pvm_memfd_create(const char *name);
// Seals a memfd against shrinking, growing and further seals; with `future_write`, also
// F_SEAL_FUTURE_WRITE: no new writable mapping and no write(2), while mappings made before
// keep working (L0's). Returns 0 or -errno.
int pvm_memfd_seal(int fd, int future_write);
// The memfd's seals (F_GET_SEALS), or -errno.
int pvm_memfd_seals(int fd);
// The F_SEAL_* bits, for checking what pvm_memfd_seals returns.
int pvm_seal_future_write_bit(void);
int pvm_seal_shrink_bit(void);

// A child tier's sandbox, entered once its memory is mapped: closes every descriptor above 2
// (its memfds included: the mappings stay, and nothing can be mapped again), puts the fatal
// signals back to their default action (so a fault ends the tier with its own signal, which L0
// reports), sets no_new_privs and installs a seccomp filter that allows only the system calls
// in pvm_sandbox_syscall_name's list (futex: wait and wake only; kill/tgkill only towards this
// process), turns off core files, and kills the
// whole process with SIGSYS on any other (mremap: ENOSYS). Returns 0 or -errno.
int pvm_enter_tier_sandbox(void);
// The name of the i-th system call the sandbox allows (futex, kill and tgkill last: those are
// allowed with conditions), or NULL past the end.
const char *pvm_sandbox_syscall_name(int i);

// Hostile probes for the guest programs that test L0's defences: mprotect(2) of a mapping to
// read-write (0 or -errno), and kill(2) (0 or -errno; under the sandbox, the caller dies).
int pvm_probe_make_writable(void *addr, size_t length);
// mremap(2) of a mapping to twice its length, in place or moved: 0 (and put back) or -errno.
int pvm_probe_grow(void *addr, size_t length);
// madvise(MADV_REMOVE) of a mapping (punch a hole in the file behind it): 0 or -errno.
int pvm_probe_punch(void *addr, size_t length);
// How many of descriptors 3..1023 close(2) succeeded on (the ones that were open).
int pvm_probe_close_descriptors(void);
int pvm_probe_kill(pid_t pid, int sig);

// posix_spawn of `path` with `argv`, after dup2-ing each fds[i] onto 3+i in the child (so the
// child finds its memfds at fixed numbers). Returns the pid, or -errno.
pid_t pvm_spawn(const char *path, char *const argv[], const int *fds, int nfds);

// prctl(PR_SET_PDEATHSIG, SIGKILL): this process dies with its parent. Returns 0 or -errno.
int pvm_die_with_parent(void);
// prctl(PR_SET_NAME): the name `ps -o comm` shows (at most 15 bytes).
int pvm_set_process_name(const char *name);
// sched_setaffinity to one CPU; returns 0 or -errno.
int pvm_pin_to_cpu(int cpu);
// The CPUs this process may run on, as a bitmask of the first 64 (0 on error).
uint64_t pvm_allowed_cpus(void);
// A whole cpu_set_t (1024 CPUs), opaque to Swift: the calling thread's affinity, saved and
// restored exactly, however many CPUs the machine has. Each returns 0 or -errno.
typedef struct { uint8_t bytes[128]; } pvm_cpu_set;
int pvm_get_affinity(pvm_cpu_set *out);
int pvm_set_affinity(const pvm_cpu_set *in);

// SIGINT/SIGTERM for L0: the first one is recorded (pvm_stop_signal returns it) so the stack can
// stop in order and report; a second one of either restores the default action and re-raises it.
// Returns 0 or -errno.
int pvm_install_stop_handlers(void);
// The first SIGINT/SIGTERM received since pvm_install_stop_handlers, or 0.
int pvm_stop_signal(void);
// SIGINT/SIGTERM ignored (a child tier: a terminal's ^C reaches the whole process group, and the
// children must let L0 stop them in order). Returns 0 or -errno.
int pvm_ignore_stop_signals(void);

// The GNU build ID (NT_GNU_BUILD_ID note) of this program, or of the ELF file at `path`: writes
// up to `cap` bytes to `out` and returns its length, 0 if there is none, or -errno.
int pvm_self_build_id(uint8_t *out, int cap);
int pvm_file_build_id(const char *path, uint8_t *out, int cap);

// This machine's own one-level costs, for `pvm calibrate` (each returns CLOCK_MONOTONIC ns for the
// whole loop, or 0 on error): `n` CPUID instructions of `leaf` executed natively (inside a VM they
// trap to the hypervisor below it: one-level exits); `n` getpid system calls (SYSCALL/SYSRET and
// a null handler, no exit); first writes to `pages` fresh anonymous pages (a minor fault each).
uint64_t pvm_time_native_cpuid(uint32_t leaf, uint64_t n);
uint64_t pvm_time_getpid(uint64_t n);
uint64_t pvm_time_page_faults(uint64_t pages);

// A compiler barrier plus a CPU pause hint for spin loops.
static inline void pvm_cpu_relax(void) { __builtin_ia32_pause(); }

#endif
