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
 * A child (nice 19) fills <fill-percent> of MemTotal with pseudo-random pages (incompressible),
 * keeps them resident in anonymous memory, prints "FILLED <MiB>", then rewrites whole 4 KiB
 * pages at <dirty-MiB/s>, walking sequentially through the filled area (wrapping),
 * rate-limited in 10 ms slices.  Every ~5 s it prints "DIRTY <MiB/s>": bytes actually
 * written / elapsed over that window, one decimal.  Extra "INFO ..." lines are informational
 * only.
 *
 * Every page the child writes (fill and dirty) is self-describing, so that the guest's memory
 * can be checked after a replication or a switch:
 *   bytes 0..7    magic "GLPAGE01"
 *   bytes 8..11   page index in the area (little-endian u32)
 *   bytes 12..15  generation (u32): 1 for the fill, +1 at every rewrite
 *   bytes 16..    xorshift64* output seeded from (per-boot key, index, generation)
 * The child keeps a table of the generation it last wrote to each page.
 *
 * Memory check (opt-in): "memcheck=<seconds>" on the kernel command line (read from
 * /proc/cmdline by guestload itself; default 0 = off).  Every <seconds> (start to start, or
 * back to back when a pass takes longer) a pass walks every page of the area and checks
 * magic, index, generation == the table's and the content.  It runs in the dirtier's loop,
 * at most 5 ms per 10 ms slice, so it delays but never starves the dirtier (DIRTY shows the
 * rate achieved).  Each pass ends with exactly one line:
 *   "MEMCHECK OK pass=<k> pages=<n>"        k = 1, 2, ...; n pages checked
 *   "MEMCHECK FAIL pass=<k> bad=<count>"    count pages failed in this pass
 * preceded, for a failed pass, by at most 8 lines, one per bad page:
 *   "MEMCHECK FAIL page=<i> gen=<g> hdr_page=<j> hdr_gen=<h> why=<magic|index|generation|content>"
 *   i = page index, g = generation the table expects, j/h = what the page's header says.
 * A stale copy of a page (older generation) fails with why=generation, a zero or foreign page
 * with why=magic, a torn page (new header, old body) with why=content.  The check never
 * repairs anything: a bad page fails every later pass until the dirtier rewrites it.
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
#define WORDS (PAGE / sizeof(uint64_t))
#define PAGE_MAGIC 0x3130454741504c47ULL /* "GLPAGE01" in memory (little-endian) */
#define VERIFY_SLICE_S 0.005             /* a memcheck pass's share of each 10 ms slice */
#define VERIFY_MAX_LINES 8               /* per-page FAIL lines per pass */

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

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* The worker's area: its pages, the generation last written to each, a per-boot key. */
struct area {
    uint64_t *base;
    size_t npages;
    uint32_t *gen;
    uint64_t key;
};

static uint64_t page_seed(uint64_t key, size_t i, uint32_t g)
{
    uint64_t s = splitmix64(key ^ splitmix64(((uint64_t)i << 32) | g));
    return s ? s : 1;
}

/* Rewrite page i as its next generation: header, then a body derived from (key, i, gen). */
static void write_page(struct area *a, size_t i)
{
    uint32_t g = ++a->gen[i];
    uint64_t *p = a->base + i * WORDS;
    uint64_t s = page_seed(a->key, i, g);
    p[0] = PAGE_MAGIC;
    p[1] = (uint64_t)(uint32_t)i | (uint64_t)g << 32;
    for (size_t w = 2; w < WORDS; w++)
        p[w] = xorshift64s(&s);
}

/* NULL if page i is what the table says was written last, else why not. */
static const char *check_page(const struct area *a, size_t i, uint32_t *hdr_i, uint32_t *hdr_g)
{
    const volatile uint64_t *p = a->base + i * WORDS; /* the host may change it under us */
    uint32_t g = a->gen[i];
    uint64_t h = p[1];
    *hdr_i = (uint32_t)h;
    *hdr_g = (uint32_t)(h >> 32);
    if (p[0] != PAGE_MAGIC)
        return "magic";
    if (*hdr_i != (uint32_t)i)
        return "index";
    if (*hdr_g != g)
        return "generation";
    uint64_t s = page_seed(a->key, i, g);
    for (size_t w = 2; w < WORDS; w++)
        if (p[w] != xorshift64s(&s))
            return "content";
    return NULL;
}

/* A memcheck pass in progress (or the time the next one starts). */
struct verifier {
    double period; /* seconds between pass starts; 0 = off */
    double next_start;
    int active;
    long pass;
    size_t cursor, checked, bad;
};

/* Advance the memcheck by at most VERIFY_SLICE_S of work; print a pass's result at its end. */
static void verify_step(struct verifier *v, const struct area *a)
{
    double t = now_s();
    if (!v->active) {
        if (t < v->next_start)
            return;
        v->active = 1;
        v->pass++;
        v->cursor = v->checked = v->bad = 0;
        v->next_start = t + v->period;
    }
    double end = t + VERIFY_SLICE_S;
    while (v->cursor < a->npages) {
        size_t i = v->cursor++;
        uint32_t hi, hg;
        const char *why = check_page(a, i, &hi, &hg);
        v->checked++;
        if (why && v->bad++ < VERIFY_MAX_LINES)
            say("MEMCHECK FAIL page=%zu gen=%u hdr_page=%u hdr_gen=%u why=%s\n", i, a->gen[i],
                hi, hg, why);
        if ((v->cursor & 15) == 0 && now_s() >= end)
            return;
    }
    if (v->bad)
        say("MEMCHECK FAIL pass=%ld bad=%zu\n", v->pass, v->bad);
    else
        say("MEMCHECK OK pass=%ld pages=%zu\n", v->pass, v->checked);
    v->active = 0;
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

static void worker(double fill_pct, double dirty_mib, double memcheck_s)
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

    struct area a = {.npages = size / PAGE, .key = seed()};
    a.base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    a.gen = calloc(a.npages, sizeof *a.gen);
    if (a.base == MAP_FAILED || !a.gen) {
        say("INFO fill failed: mmap %zu MiB: %s\n", size >> 20, strerror(errno));
        sleep_forever();
    }
    madvise(a.base, size, MADV_HUGEPAGE); /* fewer page faults under TCG */

    double t0 = now_s();
    for (size_t i = 0; i < a.npages; i++)
        write_page(&a, i);
    double t1 = now_s();
    say("FILLED %zu\n", size >> 20);
    say("INFO fill took %.2f s (%.0f MiB/s)\n", t1 - t0, size / MiB / (t1 - t0 > 0 ? t1 - t0 : 1e-9));

    struct verifier v = {.period = memcheck_s, .next_start = t1 + memcheck_s};
    if (memcheck_s > 0)
        say("INFO memcheck every %g s over %zu pages\n", memcheck_s, a.npages);
    if (dirty_mib <= 0 && memcheck_s <= 0)
        sleep_forever();

    const double rate = dirty_mib * MiB; /* bytes per second */
    size_t pos = 0;
    double base = now_s(), credited = 0; /* bytes written since base, for rate limiting */
    double win_t = base, win_bytes = 0;  /* bytes written since win_t, for reporting */
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);

    for (;;) {
        if (rate > 0) {
            double t = now_s();
            double allowed = (t - base) * rate;
            if (allowed - credited > rate * DEBT_S)
                credited = allowed - rate * DEBT_S;
            while (credited + PAGE <= allowed) {
                write_page(&a, pos);
                pos = pos + 1 < a.npages ? pos + 1 : 0;
                credited += PAGE;
                win_bytes += PAGE;
            }
            t = now_s();
            if (t - win_t >= REPORT_S) {
                say("DIRTY %.1f\n", win_bytes / MiB / (t - win_t));
                win_t = t;
                win_bytes = 0;
            }
        }
        if (memcheck_s > 0)
            verify_step(&v, &a);
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

/* "<name>=<value>" from the kernel command line as a number; 0 if absent.  Read here rather
 * than passed by /init so that adding a knob does not change build-guest.sh (and with it the
 * kernel's rebuild stamp). */
static double cmdline_num(const char *name)
{
    char line[4096], *save = NULL;
    size_t len = strlen(name);
    FILE *f = fopen("/proc/cmdline", "r");
    if (!f)
        return 0;
    char *ok = fgets(line, sizeof line, f);
    fclose(f);
    if (!ok)
        return 0;
    for (char *tok = strtok_r(line, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save))
        if (strncmp(tok, name, len) == 0 && tok[len] == '=')
            return arg_num(tok + len + 1, name);
    return 0;
}

int main(int argc, char **argv)
{
    double fill = argc > 1 ? arg_num(argv[1], "fill") : 0;
    double dirty = argc > 2 ? arg_num(argv[2], "dirty") : 0;
    double memcheck = cmdline_num("memcheck");
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
            worker(fill, dirty, memcheck);
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
