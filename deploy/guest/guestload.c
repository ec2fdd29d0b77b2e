/*
 * guestload: the workload of replicator's tiny test guest (run as PID 1 by /init).
 *
 *   guestload <fill-percent> <dirty-MiB/s>
 *
 * The parent (PID 1) is the counter: it prints "COUNTER <n>" on stdout (the serial console)
 * every 0.5 s, n = 0, 1, 2, ... forever.  It runs SCHED_FIFO and sleeps on absolute
 * CLOCK_MONOTONIC deadlines, so it keeps ticking while the worker hogs the only vCPU.  If the
 * clock jumps forward (e.g. a long pause) it re-bases instead of printing a burst; n always
 * grows by exactly 1 per line.
 *
 * A child (nice 19) fills <fill-percent> of MemTotal with xorshift64* output (incompressible),
 * keeps it resident in anonymous memory, prints "FILLED <MiB>", then rewrites whole 4 KiB
 * pages with fresh random data at <dirty-MiB/s>, walking sequentially through the filled area
 * (wrapping), rate-limited in 10 ms slices.  Every ~5 s it prints "DIRTY <MiB/s>": bytes
 * actually written / elapsed over that window, one decimal.  Extra "INFO ..." lines are
 * informational only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MiB (1024.0 * 1024.0)
#define PAGE 4096UL
#define TICK_NS 500000000L
#define SLICE_NS 10000000L
#define REPORT_S 5.0
#define DEBT_S 0.1 /* a dirtier that falls behind forgives debt beyond this much time */
#define DIRTY_ONLY_AREA (64UL << 20)

/* One write() per line so lines from the two processes never interleave mid-line. */
static void say(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof buf)
        n = sizeof buf - 1;
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(1, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        p += w;
        n -= w;
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void ts_add_ns(struct timespec *t, long ns)
{
    t->tv_nsec += ns;
    while (t->tv_nsec >= 1000000000L) {
        t->tv_nsec -= 1000000000L;
        t->tv_sec++;
    }
}

static int ts_before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

static inline uint64_t xorshift64s(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static void fill_words(uint64_t *p, size_t nwords, uint64_t *s)
{
    for (size_t i = 0; i < nwords; i++)
        p[i] = xorshift64s(s);
}

static uint64_t seed(void)
{
    uint64_t s = 0x9E3779B97F4A7C15ULL ^ (uint64_t)now_s() * 1000003ULL;
    const unsigned char *r = (const unsigned char *)getauxval(AT_RANDOM);
    if (r) {
        uint64_t v;
        memcpy(&v, r, sizeof v);
        s ^= v;
    }
    return s ? s : 1;
}

static unsigned long memtotal_bytes(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[128];
    unsigned long kb = 0;
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemTotal: %lu kB", &kb) == 1)
            break;
    fclose(f);
    return kb * 1024UL;
}

static void sleep_forever(void)
{
    for (;;)
        pause();
}

static void worker(double fill_pct, double dirty_mib)
{
    setpriority(PRIO_PROCESS, 0, 19);

    unsigned long total = memtotal_bytes();
    size_t size = (size_t)(total * (fill_pct / 100.0)) & ~(PAGE - 1);
    if (size == 0 && dirty_mib > 0) {
        size = DIRTY_ONLY_AREA;
        if (size > total / 4)
            size = (total / 4) & ~(PAGE - 1);
    }
    if (size == 0)
        sleep_forever();

    say("INFO fill %.0f%% of MemTotal %lu MiB = %zu MiB, dirty %.1f MiB/s\n", fill_pct,
        total >> 20, size >> 20, dirty_mib);

    uint64_t *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        say("INFO fill failed: mmap %zu MiB: %s\n", size >> 20, strerror(errno));
        sleep_forever();
    }
    madvise(buf, size, MADV_HUGEPAGE); /* fewer page faults under TCG */

    uint64_t s = seed();
    double t0 = now_s();
    fill_words(buf, size / sizeof(uint64_t), &s);
    double t1 = now_s();
    say("FILLED %zu\n", size >> 20);
    say("INFO fill took %.2f s (%.0f MiB/s)\n", t1 - t0, size / MiB / (t1 - t0 > 0 ? t1 - t0 : 1e-9));

    if (dirty_mib <= 0)
        sleep_forever();

    const double rate = dirty_mib * MiB; /* bytes per second */
    const size_t npages = size / PAGE;
    const size_t words = PAGE / sizeof(uint64_t);
    size_t pos = 0;
    double base = now_s(), credited = 0; /* bytes written since base, for rate limiting */
    double win_t = base, win_bytes = 0;  /* bytes written since win_t, for reporting */
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);

    for (;;) {
        double t = now_s();
        double allowed = (t - base) * rate;
        if (allowed - credited > rate * DEBT_S)
            credited = allowed - rate * DEBT_S;
        while (credited + PAGE <= allowed) {
            fill_words(buf + pos * words, words, &s);
            pos = pos + 1 < npages ? pos + 1 : 0;
            credited += PAGE;
            win_bytes += PAGE;
        }
        t = now_s();
        if (t - win_t >= REPORT_S) {
            say("DIRTY %.1f\n", win_bytes / MiB / (t - win_t));
            win_t = t;
            win_bytes = 0;
        }
        ts_add_ns(&next, SLICE_NS);
        struct timespec cur;
        clock_gettime(CLOCK_MONOTONIC, &cur);
        if (ts_before(&next, &cur))
            next = cur; /* behind schedule: don't try to catch up sleeps */
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
}

static double arg_num(const char *s, const char *what)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || v < 0) {
        say("INFO bad %s '%s', using 0\n", what, s);
        return 0;
    }
    return v;
}

int main(int argc, char **argv)
{
    double fill = argc > 1 ? arg_num(argv[1], "fill") : 0;
    double dirty = argc > 2 ? arg_num(argv[2], "dirty") : 0;
    if (fill > 95) {
        say("INFO fill %.0f%% capped at 95%%\n", fill);
        fill = 95;
    }

    /* Plain "\n" line ends on the serial log (no tty CR insertion), and start on a fresh line:
     * with "quiet" the firmware's last message ("Booting from ROM..") has no newline. */
    struct termios tio;
    if (tcgetattr(1, &tio) == 0) {
        tio.c_oflag &= ~ONLCR;
        tcsetattr(1, TCSANOW, &tio);
    }
    say("\n");

    long n = 0;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    say("COUNTER %ld\n", n++);

    pid_t child = -1;
    if (fill > 0 || dirty > 0) {
        child = fork();
        if (child == 0) {
            worker(fill, dirty);
            _exit(0);
        }
        if (child < 0)
            say("INFO fork failed: %s\n", strerror(errno));
    }

    struct sched_param sp = {.sched_priority = 10};
    if (sched_setscheduler(0, SCHED_FIFO, &sp) != 0)
        setpriority(PRIO_PROCESS, 0, -20);

    for (;;) {
        ts_add_ns(&next, TICK_NS);
        struct timespec cur;
        clock_gettime(CLOCK_MONOTONIC, &cur);
        if (ts_before(&next, &cur)) {
            /* Deadline already passed (e.g. clock jumped): re-base, no catch-up burst. */
            struct timespec late = next;
            ts_add_ns(&late, TICK_NS);
            if (ts_before(&late, &cur))
                next = cur;
        }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
        say("COUNTER %ld\n", n++);

        int status;
        pid_t p;
        while ((p = waitpid(-1, &status, WNOHANG)) > 0)
            if (p == child)
                say("INFO worker exited (status 0x%x)\n", status);
    }
}
