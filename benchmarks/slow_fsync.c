/* Benchmarks only: make every fsync and fdatasync take SLOW_FSYNC_US microseconds (default
 * 1000) longer, to show what group commit gains on a disk slower than the one at hand.
 * Loaded into the server with LD_PRELOAD by benchmarks/run.py (figure 7); the server itself
 * is unchanged. The wait is a sleep, like a device's: it costs no CPU. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>

static void wait_like_a_disk(void) {
    const char *text = getenv("SLOW_FSYNC_US");
    long us = text ? atol(text) : 1000;
    struct timespec left = {us / 1000000, (us % 1000000) * 1000};
    int saved = errno;
    while (nanosleep(&left, &left) == -1 && errno == EINTR) {
    }
    errno = saved;
}

/* Each wrapper calls the real function, then waits. */
#define DELAYED(name)                                              \
    int name(int fd) {                                             \
        static int (*real)(int);                                   \
        if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, #name);   \
        int result = real(fd);                                     \
        wait_like_a_disk();                                        \
        return result;                                             \
    }

DELAYED(fsync)
DELAYED(fdatasync)
