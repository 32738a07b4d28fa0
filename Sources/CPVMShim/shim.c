#define _GNU_SOURCE
#include "pvm_shim.h"

#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <stdlib.h>
#include <string.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/futex.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

int pvm_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts = { .tv_sec = timeout_ns / 1000000000LL, .tv_nsec = timeout_ns % 1000000000LL };
    long r = syscall(SYS_futex, addr, FUTEX_WAIT, expected, timeout_ns >= 0 ? &ts : NULL, NULL, 0);
    return r == 0 ? 0 : -errno;
}

int pvm_futex_wake(uint32_t *addr, int count) {
    long r = syscall(SYS_futex, addr, FUTEX_WAKE, count, NULL, NULL, 0);
    return r >= 0 ? (int)r : -errno;
}

int pvm_futex_waitv(uint32_t *const *addrs, const uint32_t *expected, int count, int64_t timeout_ns) {
    if (count <= 0 || count > PVM_FUTEX_WAITV_MAX) return -EINVAL;
    struct futex_waitv w[PVM_FUTEX_WAITV_MAX];
    for (int i = 0; i < count; i++) {
        w[i] = (struct futex_waitv){ .val = expected[i], .uaddr = (uint64_t)(uintptr_t)addrs[i], .flags = FUTEX_32 };
    }
    struct timespec now, *deadline = NULL, at;
    if (timeout_ns >= 0) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t ns = now.tv_nsec + timeout_ns % 1000000000LL;
        at.tv_sec = now.tv_sec + timeout_ns / 1000000000LL + ns / 1000000000LL;
        at.tv_nsec = ns % 1000000000LL;
        deadline = &at;
    }
    long r = syscall(SYS_futex_waitv, w, (unsigned)count, 0, deadline, CLOCK_MONOTONIC);
    return r >= 0 ? (int)r : -errno;
}

int pvm_memfd_create(const char *name) {
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    return fd >= 0 ? fd : -errno;
}

int pvm_memfd_seal(int fd, int future_write) {
    int seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL | (future_write ? F_SEAL_FUTURE_WRITE : 0);
    return fcntl(fd, F_ADD_SEALS, seals) == 0 ? 0 : -errno;
}

int pvm_memfd_seals(int fd) {
    int r = fcntl(fd, F_GET_SEALS);
    return r >= 0 ? r : -errno;
}

int pvm_seal_future_write_bit(void) { return F_SEAL_FUTURE_WRITE; }
int pvm_seal_shrink_bit(void) { return F_SEAL_SHRINK; }

// What a child tier does after it has mapped its memory: wait for its turn (futex, sched_yield,
// the clock), allocate (mmap, munmap, madvise, mprotect, brk), write diagnostics to stderr with
// write(2), and exit. Measured with strace over a full `pvm bench` and the test suite; nothing
// opens, stats, maps a file, forks, executes, signals another process or touches a socket.
// futex, kill and tgkill are checked further (below); mremap is answered ENOSYS (glibc's realloc
// falls back to copying), because growing a shared mapping would reach past the memfd window
// the tier was given.
#define PVM_SANDBOX_SYSCALLS(X) \
    X(sched_yield) X(clock_gettime) X(clock_nanosleep) X(nanosleep) X(gettimeofday) \
    X(mmap) X(munmap) X(madvise) X(mprotect) X(brk) \
    X(write) X(writev) X(close) \
    X(getpid) X(gettid) X(getppid) X(getrandom) X(rt_sigaction) X(rt_sigprocmask) X(rt_sigreturn) \
    X(restart_syscall) X(exit) X(exit_group)

static const int pvm_sandbox_numbers[] = {
#define PVM_NUMBER(name) SYS_##name,
    PVM_SANDBOX_SYSCALLS(PVM_NUMBER)
#undef PVM_NUMBER
};
static const char *const pvm_sandbox_names[] = {
#define PVM_NAME(name) #name,
    PVM_SANDBOX_SYSCALLS(PVM_NAME)
#undef PVM_NAME
};
#define PVM_SANDBOX_COUNT ((int)(sizeof(pvm_sandbox_numbers) / sizeof(pvm_sandbox_numbers[0])))
// The calls allowed with conditions, named after the plain ones.
static const char *const pvm_sandbox_conditional[] = { "futex", "kill", "tgkill" };

const char *pvm_sandbox_syscall_name(int i) {
    if (i >= 0 && i < PVM_SANDBOX_COUNT) return pvm_sandbox_names[i];
    if (i >= PVM_SANDBOX_COUNT && i < PVM_SANDBOX_COUNT + 3) return pvm_sandbox_conditional[i - PVM_SANDBOX_COUNT];
    return NULL;
}

int pvm_enter_tier_sandbox(void) {
    // Descriptors: the memfds are mapped already; with them closed (and open/openat refused
    // below) the tier can reach no memory beyond what it mapped.
    if (syscall(SYS_close_range, 3, ~0U, 0) != 0) return -errno;
    // Fatal signals back to the default: the Swift runtime's crash handler would spawn a
    // backtracer, which the filter refuses, so the tier would die of SIGSYS instead of its fault.
    const int fatal[] = { SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGABRT, SIGQUIT };
    for (unsigned i = 0; i < sizeof(fatal) / sizeof(fatal[0]); i++) signal(fatal[i], SIG_DFL);
    // No core file: a hostile tier's core would hold its shared mappings (L1's memory) on disk.
    struct rlimit none = { 0, 0 };
    if (setrlimit(RLIMIT_CORE, &none) != 0) return -errno;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -errno;

    struct sock_filter f[4 + 2 * PVM_SANDBOX_COUNT + 24];
    int n = 0;
#define STMT(code, k) f[n++] = (struct sock_filter)BPF_STMT(code, k)
#define JUMP(code, k, jt, jf) f[n++] = (struct sock_filter)BPF_JUMP(code, k, jt, jf)
    // Only the x86-64 ABI: an i386 or x32 system call number means something else.
    STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
    STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    for (int i = 0; i < PVM_SANDBOX_COUNT; i++) {
        JUMP(BPF_JMP | BPF_JEQ | BPF_K, pvm_sandbox_numbers[i], 0, 1);
        STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    }
    // mremap: refused with ENOSYS, the tier lives on.
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mremap, 0, 1);
    STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS);
    // futex: wait and wake (with or without the private and realtime-clock flags), and the
    // priority-inheritance lock operations on private futexes only (the Swift runtime's locks
    // use them when a tier's vCPU threads contend); no requeue, wake-op, or PI operation on a
    // shared futex that could touch another tier's waiters.
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_futex, 0, 11);
    STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1]));
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, FUTEX_LOCK_PI | FUTEX_PRIVATE_FLAG, 8, 0);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, FUTEX_UNLOCK_PI | FUTEX_PRIVATE_FLAG, 7, 0);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, FUTEX_TRYLOCK_PI | FUTEX_PRIVATE_FLAG, 6, 0);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, FUTEX_LOCK_PI2 | FUTEX_PRIVATE_FLAG, 5, 0);
    STMT(BPF_ALU | BPF_AND | BPF_K, FUTEX_CMD_MASK);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, FUTEX_WAIT, 3, 0);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, FUTEX_WAKE, 2, 0);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, FUTEX_WAIT_BITSET, 1, 0);
    STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    // kill and tgkill towards this process only (raise/abort): never towards L0 or the other tier.
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_kill, 1, 0);
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_tgkill, 0, 3);
    STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0]));
    JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)getpid(), 0, 1);
    STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
#undef STMT
#undef JUMP
    struct sock_fprog prog = { .len = (unsigned short)n, .filter = f };
    // TSYNC: every thread of the tier, should the runtime have started one. The call returns
    // the id of a thread it could not synchronise (> 0) without setting errno.
    long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog);
    if (r > 0) return -ESRCH;
    if (r < 0) return -errno;
    return 0;
}

int pvm_probe_make_writable(void *addr, size_t length) {
    return mprotect(addr, length, PROT_READ | PROT_WRITE) == 0 ? 0 : -errno;
}

int pvm_probe_grow(void *addr, size_t length) {
    void *p = mremap(addr, length, 2 * length, MREMAP_MAYMOVE);
    if (p == MAP_FAILED) return -errno;
    // It worked (no sandbox): shrink it back where it went, so the caller's view stays valid.
    if (p != addr) { munmap(p, 2 * length); return 0; }
    munmap((char *)addr + length, length);
    return 0;
}

int pvm_probe_punch(void *addr, size_t length) {
    return madvise(addr, length, MADV_REMOVE) == 0 ? 0 : -errno;
}

int pvm_probe_close_descriptors(void) {
    int closed = 0;
    for (int fd = 3; fd < 1024; fd++) if (close(fd) == 0) closed++;
    return closed;
}

int pvm_probe_kill(pid_t pid, int sig) {
    return kill(pid, sig) == 0 ? 0 : -errno;
}

pid_t pvm_spawn(const char *path, char *const argv[], const int *fds, int nfds) {
    // Sources first copied above every target (close-on-exec), so no dup2 onto 3+i overwrites
    // a source a later one still needs, whatever numbers L0's memfds happen to have.
    int sources[16];
    if (nfds < 0 || nfds > 16) return -EINVAL;
    for (int i = 0; i < nfds; i++) {
        sources[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3 + nfds);
        if (sources[i] < 0) {
            int e = errno;
            for (int j = 0; j < i; j++) close(sources[j]);
            return -e;
        }
    }
    posix_spawn_file_actions_t actions;
    if (posix_spawn_file_actions_init(&actions) != 0) {
        for (int i = 0; i < nfds; i++) close(sources[i]);
        return -ENOMEM;
    }
    for (int i = 0; i < nfds; i++) {
        // dup2 onto a fixed number also clears FD_CLOEXEC on the target, so the child keeps it.
        if (posix_spawn_file_actions_adddup2(&actions, sources[i], 3 + i) != 0) {
            posix_spawn_file_actions_destroy(&actions);
            for (int j = 0; j < nfds; j++) close(sources[j]);
            return -EINVAL;
        }
    }
    // The child starts with SIGINT and SIGTERM blocked: a ^C to the process group while it is
    // still starting must not kill it (it ignores both, then unblocks, in pvm_ignore_stop_signals).
    posix_spawnattr_t attr;
    if (posix_spawnattr_init(&attr) != 0) {
        posix_spawn_file_actions_destroy(&actions);
        for (int i = 0; i < nfds; i++) close(sources[i]);
        return -ENOMEM;
    }
    sigset_t blocked;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGINT);
    sigaddset(&blocked, SIGTERM);
    posix_spawnattr_setsigmask(&attr, &blocked);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    pid_t pid = -1;
    int r = posix_spawn(&pid, path, &actions, &attr, argv, environ);
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&actions);
    for (int i = 0; i < nfds; i++) close(sources[i]);
    return r == 0 ? pid : -r;
}

int pvm_die_with_parent(void) {
    return prctl(PR_SET_PDEATHSIG, SIGKILL) == 0 ? 0 : -errno;
}

int pvm_set_process_name(const char *name) {
    return prctl(PR_SET_NAME, name) == 0 ? 0 : -errno;
}

int pvm_pin_to_cpu(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof(set), &set) == 0 ? 0 : -errno;
}

_Static_assert(sizeof(pvm_cpu_set) == sizeof(cpu_set_t), "pvm_cpu_set holds a cpu_set_t");

int pvm_get_affinity(pvm_cpu_set *out) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return -errno;
    memcpy(out, &set, sizeof(set));
    return 0;
}

int pvm_set_affinity(const pvm_cpu_set *in) {
    cpu_set_t set;
    memcpy(&set, in, sizeof(set));
    return sched_setaffinity(0, sizeof(set), &set) == 0 ? 0 : -errno;
}

uint64_t pvm_allowed_cpus(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return 0;
    uint64_t mask = 0;
    for (int i = 0; i < 64; i++) if (CPU_ISSET(i, &set)) mask |= (1ULL << i);
    return mask;
}

static volatile sig_atomic_t pvm_stop_signo = 0;

static void pvm_on_stop_signal(int signo) {
    if (pvm_stop_signo == 0) { pvm_stop_signo = signo; return; }
    // A second signal: the user means it. sigaction and raise are async-signal-safe.
    struct sigaction dfl = { 0 };
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(signo, &dfl, NULL);
    raise(signo);
}

static int pvm_set_stop_action(void (*handler)(int)) {
    struct sigaction sa = { 0 };
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    // Each blocks the other while the handler runs: its check-then-store is not interrupted.
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGTERM);
    sa.sa_flags = SA_RESTART;   // every other call goes on; the vCPU loop looks within a sleep slice
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0) return -errno;
    return 0;
}

int pvm_install_stop_handlers(void) { return pvm_set_stop_action(pvm_on_stop_signal); }
int pvm_stop_signal(void) { return pvm_stop_signo; }
int pvm_ignore_stop_signals(void) {
    int r = pvm_set_stop_action(SIG_IGN);
    if (r != 0) return r;
    // Ignored now, so unblocking them (pvm_spawn started this child with them blocked) drops any
    // that arrived while it was starting.
    sigset_t both;
    sigemptyset(&both);
    sigaddset(&both, SIGINT);
    sigaddset(&both, SIGTERM);
    return sigprocmask(SIG_UNBLOCK, &both, NULL) == 0 ? 0 : -errno;
}

// Copies the build ID out of a note section [notes, notes + size), 0 if it holds none.
static int pvm_build_id_in_notes(const uint8_t *notes, size_t size, uint8_t *out, int cap) {
    size_t off = 0;
    while (off + sizeof(Elf64_Nhdr) <= size) {
        const Elf64_Nhdr *n = (const Elf64_Nhdr *)(notes + off);
        // The sizes come from a file: round in 64 bits so 0xFFFFFFFF cannot wrap to 0.
        size_t name = ((size_t)n->n_namesz + 3) & ~(size_t)3, desc = ((size_t)n->n_descsz + 3) & ~(size_t)3;
        size_t payload = off + sizeof(Elf64_Nhdr);
        if (name > size - payload || desc > size - payload - name) return 0;
        if (n->n_type == NT_GNU_BUILD_ID && n->n_namesz == 4 && n->n_descsz <= desc && memcmp(notes + payload, "GNU", 4) == 0) {
            int len = n->n_descsz < (Elf64_Word)cap ? (int)n->n_descsz : cap;
            memcpy(out, notes + payload + name, (size_t)len);
            return len;
        }
        off = payload + name + desc;
    }
    return 0;
}

struct pvm_build_id_search { uint8_t *out; int cap; int len; };

static int pvm_build_id_of_main(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    struct pvm_build_id_search *s = data;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_NOTE) continue;
        int len = pvm_build_id_in_notes((const uint8_t *)(info->dlpi_addr + ph->p_vaddr), ph->p_memsz, s->out, s->cap);
        if (len > 0) { s->len = len; break; }
    }
    return 1;   // the first object is the main program: stop there
}

int pvm_self_build_id(uint8_t *out, int cap) {
    struct pvm_build_id_search s = { out, cap, 0 };
    dl_iterate_phdr(pvm_build_id_of_main, &s);
    return s.len;
}

int pvm_file_build_id(const char *path, uint8_t *out, int cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    int result = 0;
    Elf64_Ehdr eh;
    if (pread(fd, &eh, sizeof eh, 0) != (ssize_t)sizeof eh || memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0
        || eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_phentsize != sizeof(Elf64_Phdr) || eh.e_phnum > 256) {
        close(fd);
        return -ENOEXEC;
    }
    for (int i = 0; i < eh.e_phnum && result == 0; i++) {
        Elf64_Phdr ph;
        if (pread(fd, &ph, sizeof ph, (off_t)(eh.e_phoff + (uint64_t)i * sizeof ph)) != (ssize_t)sizeof ph) break;
        if (ph.p_type != PT_NOTE || ph.p_filesz == 0 || ph.p_filesz > 65536) continue;
        uint8_t *notes = malloc(ph.p_filesz);   // not on the stack: callers' threads may have small ones
        if (notes == NULL) break;
        if (pread(fd, notes, ph.p_filesz, (off_t)ph.p_offset) == (ssize_t)ph.p_filesz)
            result = pvm_build_id_in_notes(notes, ph.p_filesz, out, cap);
        free(notes);
    }
    close(fd);
    return result;
}

static uint64_t pvm_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

uint64_t pvm_time_native_cpuid(uint32_t leaf, uint64_t n) {
    uint64_t start = pvm_now_ns();
    for (uint64_t i = 0; i < n; i++) {
        uint32_t a = leaf, b, c = 0, d;
        __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d) :: "memory");
    }
    return pvm_now_ns() - start;
}

uint64_t pvm_time_getpid(uint64_t n) {
    uint64_t start = pvm_now_ns();
    for (uint64_t i = 0; i < n; i++) (void)syscall(SYS_getpid);
    return pvm_now_ns() - start;
}

uint64_t pvm_time_page_faults(uint64_t pages) {
    size_t bytes = (size_t)pages * 4096;
    volatile uint8_t *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 0;
    uint64_t start = pvm_now_ns();
    for (uint64_t i = 0; i < pages; i++) p[i * 4096] = 1;
    uint64_t elapsed = pvm_now_ns() - start;
    munmap((void *)p, bytes);
    return elapsed;
}
