#define _GNU_SOURCE
#include "pvm_shim.h"

#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/prctl.h>
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

int pvm_memfd_create(const char *name) {
    int fd = memfd_create(name, MFD_CLOEXEC);
    return fd >= 0 ? fd : -errno;
}

pid_t pvm_spawn(const char *path, char *const argv[], const int *fds, int nfds) {
    posix_spawn_file_actions_t actions;
    if (posix_spawn_file_actions_init(&actions) != 0) return -ENOMEM;
    for (int i = 0; i < nfds; i++) {
        // dup2 onto a fixed number also clears FD_CLOEXEC on the target, so the child keeps it.
        if (posix_spawn_file_actions_adddup2(&actions, fds[i], 3 + i) != 0) {
            posix_spawn_file_actions_destroy(&actions);
            return -EINVAL;
        }
    }
    pid_t pid = -1;
    int r = posix_spawn(&pid, path, &actions, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
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

uint64_t pvm_allowed_cpus(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return 0;
    uint64_t mask = 0;
    for (int i = 0; i < 64; i++) if (CPU_ISSET(i, &set)) mask |= (1ULL << i);
    return mask;
}
