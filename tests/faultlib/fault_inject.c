/*
 * LD_PRELOAD shim that makes chosen system calls fail, for I/O fault tests.
 *
 *   FAULT_OP     write | fsync | rename      which call family to break
 *   FAULT_ERRNO  errno number to fail with (e.g. 28 ENOSPC, 5 EIO)
 *   FAULT_MATCH  substring of the file path that must match (via /proc/self/fd)
 *   FAULT_SKIP   let this many matching calls through first (default 0)
 *   FAULT_ARMED  nothing fails until the process sets this (os.environ[...] = "1")
 *
 * Every matching call after the skipped ones fails (the disk stays full).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/types.h>

static long seen = 0;

static int fd_matches(int fd) {
    const char *match = getenv("FAULT_MATCH");
    if (!match) return 0;
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) return 0;
    target[n] = 0;
    return strstr(target, match) != NULL;
}

static int should_fail(const char *op, int matched) {
    const char *want = getenv("FAULT_OP");
    if (!want || strcmp(want, op) != 0 || !matched || !getenv("FAULT_ARMED")) return 0;
    const char *skip = getenv("FAULT_SKIP");
    if (seen++ < (skip ? atol(skip) : 0)) return 0;
    const char *err = getenv("FAULT_ERRNO");
    errno = err ? atoi(err) : EIO;
    return 1;
}

ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "write");
    if (fd > 2 && should_fail("write", fd_matches(fd))) return -1;
    return real(fd, buf, count);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
    if (should_fail("write", fd_matches(fd))) return -1;
    return real(fd, buf, count, offset);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite");
    if (should_fail("write", fd_matches(fd))) return -1;
    return real(fd, buf, count, offset);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    if (should_fail("fsync", fd_matches(fd))) return -1;
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    if (should_fail("fsync", fd_matches(fd))) return -1;
    return real(fd);
}

int rename(const char *old, const char *new) {
    static int (*real)(const char *, const char *);
    if (!real) real = dlsym(RTLD_NEXT, "rename");
    const char *match = getenv("FAULT_MATCH");
    if (should_fail("rename", match && strstr(new, match) != NULL)) return -1;
    return real(old, new);
}
