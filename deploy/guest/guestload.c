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
 *
 * Disk (opt-in, kernel command line): "diskcheck=<seconds>" and "diskdirty=<MiB/s>" (default
 * 0 = off, fractions allowed) work on /dev/vda (virtio-blk; /init loads its modules in the
 * background, then creates /run/modules.done) in a third process (nice 19), all I/O O_DIRECT
 * so that reads come from the disk, not the page cache.  The first half of the disk, at most
 * 64 MiB, is the check area: 1 MiB regions of 256 blocks of 4 KiB.  The rest of the disk is
 * the diskdirty area.  No /dev/vda (or one under 2 MiB) prints "DISKCHECK FAIL no disk" once.
 *
 * diskcheck: every <seconds> (start to start, back to back when a round takes longer) round k
 * (k = 1, 2, ...) writes region (k-1) mod <regions>, every block self-describing:
 *   bytes 0..7    magic "GLDISK01"
 *   bytes 8..11   region (u32)      bytes 12..15  block in the region, 0..255 (u32)
 *   bytes 16..19  round (u32)       bytes 20..23  zero
 *   bytes 24..    xorshift64* output seeded from (per-boot key, region, block, round)
 * then fdatasync, then reads back and checks the region round k-1 wrote; every 8th round
 * checks every region ever written instead.  The process keeps the round that last wrote
 * each region, so a stale block anywhere is caught.  Each round ends with exactly one line:
 *   "DISKCHECK OK round=<k> regions=<n>"    n regions checked (0 in round 1)
 *   "DISKCHECK FAIL round=<k> bad=<count>"  count bad blocks
 * preceded, for a failed round, by at most 8 lines, one per bad block (or failed I/O):
 *   "DISKCHECK FAIL round=<k> region=<r> block=<b> want_round=<w> got_round=<g>
 *    why=<magic|index|round|content|io>"   (one line)
 * w = round the table expects, g = the block header's round.  A stale block fails with
 * why=round, a zero or foreign block with why=magic, a misplaced one with why=index, a torn
 * one with why=content; why=io is a failed write or read (its blocks all count as bad).
 *
 * diskdirty: a child of the disk process rewrites the diskdirty area with fresh pseudo-random
 * data at <MiB/s>, in order and wrapping, in writes of at most 256 KiB rate-limited in 10 ms
 * slices (no fdatasync), and prints "DISKDIRTY <MiB/s>" every ~5 s: the rate achieved, like
 * DIRTY.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/ioctl.h>
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
#define DISK_DEV "/dev/vda"
#define MODULES_DONE "/run/modules.done"    /* /init has loaded the virtio-blk modules */
#define DISK_WAIT_S 30.0                    /* for MODULES_DONE, at most */
#define DBLOCK 4096UL
#define DREGION (1UL << 20)
#define DBLOCKS (DREGION / DBLOCK)
#define DWORDS (DBLOCK / sizeof(uint64_t))
#define DCHECK_MAX_REGIONS 64               /* check area: first half of the disk, <= 64 MiB */
#define DFULL_EVERY 8                       /* every 8th round checks all regions written */
#define DDIRTY_CHUNK (256UL << 10)          /* largest diskdirty write */
#define DISK_MAGIC 0x31304b5349444c47ULL   /* "GLDISK01" */

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

/* ------------------------------------------------------------------------ disk */

struct disk {
    int fd;
    uint64_t size;
    size_t nregions;             /* check area: regions 0..nregions-1 */
    uint64_t dirty_off, dirty_end; /* diskdirty area */
};

/* The disk check's state: the round that last wrote each region (0 = never). */
struct dcheck {
    uint64_t key;
    uint32_t round;
    uint32_t *last;
    uint64_t *wbuf, *rbuf; /* one region each, aligned for O_DIRECT */
    size_t bad, lines;     /* this round's */
};

static uint64_t block_seed(uint64_t key, size_t r, size_t b, uint32_t k)
{
    uint64_t s = splitmix64(key ^ splitmix64(((uint64_t)r << 40) ^ ((uint64_t)b << 32) ^ k));
    return s ? s : 1;
}

static void fill_block(uint64_t *p, uint64_t key, size_t r, size_t b, uint32_t k)
{
    uint64_t s = block_seed(key, r, b, k);
    p[0] = DISK_MAGIC;
    p[1] = (uint64_t)(uint32_t)r | (uint64_t)b << 32;
    p[2] = k;
    for (size_t w = 3; w < DWORDS; w++)
        p[w] = xorshift64s(&s);
}

/* NULL if the block is block b of region r as round k wrote it, else why not. */
static const char *check_block(const uint64_t *p, uint64_t key, size_t r, size_t b, uint32_t k,
                               uint32_t *got)
{
    *got = (uint32_t)p[2];
    if (p[0] != DISK_MAGIC)
        return "magic";
    if (p[1] != ((uint64_t)(uint32_t)r | (uint64_t)b << 32))
        return "index";
    if (p[2] != k)
        return "round";
    uint64_t s = block_seed(key, r, b, k);
    for (size_t w = 3; w < DWORDS; w++)
        if (p[w] != xorshift64s(&s))
            return "content";
    return NULL;
}

static void dfail(struct dcheck *c, size_t r, size_t b, uint32_t want, uint32_t got,
                  const char *why, size_t nbad)
{
    c->bad += nbad;
    if (c->lines++ < VERIFY_MAX_LINES)
        say("DISKCHECK FAIL round=%u region=%zu block=%zu want_round=%u got_round=%u why=%s\n",
            c->round, r, b, want, got, why);
}

/* pread/pwrite the whole length; returns the bytes done (short only on error or end). */
static size_t dio(int fd, int wr, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = wr ? pwrite(fd, (char *)buf + done, len - done, off + done)
                       : pread(fd, (char *)buf + done, len - done, off + done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        done += n;
    }
    return done;
}

static void verify_region(struct disk *d, struct dcheck *c, size_t r)
{
    uint32_t want = c->last[r], got;
    size_t n = dio(d->fd, 0, c->rbuf, DREGION, r * DREGION) / DBLOCK;
    for (size_t b = 0; b < n; b++) {
        const char *why = check_block(c->rbuf + b * DWORDS, c->key, r, b, want, &got);
        if (why)
            dfail(c, r, b, want, got, why, 1);
    }
    if (n < DBLOCKS)
        dfail(c, r, n, want, 0, "io", DBLOCKS - n);
}

/* One round: write the next region, then check the previous round's region (or all). */
static void disk_round(struct disk *d, struct dcheck *c)
{
    uint32_t k = ++c->round;
    size_t r = (k - 1) % d->nregions, checked = 0;
    c->bad = c->lines = 0;

    for (size_t b = 0; b < DBLOCKS; b++)
        fill_block(c->wbuf + b * DWORDS, c->key, r, b, k);
    size_t n = dio(d->fd, 1, c->wbuf, DREGION, r * DREGION) / DBLOCK;
    /* The table says what this round meant to write, so a failed write also fails later. */
    c->last[r] = k;
    if (n < DBLOCKS)
        dfail(c, r, n, k, 0, "io", DBLOCKS - n);
    else if (fdatasync(d->fd) != 0)
        dfail(c, r, 0, k, 0, "io", DBLOCKS);

    if (k % DFULL_EVERY == 0) {
        for (size_t i = 0; i < d->nregions; i++)
            if (c->last[i]) {
                verify_region(d, c, i);
                checked++;
            }
    } else if (k > 1) {
        verify_region(d, c, (k - 2) % d->nregions);
        checked++;
    }
    if (c->bad)
        say("DISKCHECK FAIL round=%u bad=%zu\n", k, c->bad);
    else
        say("DISKCHECK OK round=%u regions=%zu\n", k, checked);
}

static void sleep_until(double t)
{
    double dt;
    while ((dt = t - now_s()) > 0) {
        struct timespec ts = {.tv_sec = (time_t)dt, .tv_nsec = (long)((dt - (time_t)dt) * 1e9)};
        nanosleep(&ts, NULL);
    }
}

static void disk_check(struct disk *d, double period)
{
    struct dcheck c = {.key = seed(), .last = calloc(d->nregions, sizeof(uint32_t))};
    if (!c.last || posix_memalign((void **)&c.wbuf, DBLOCK, DREGION) ||
        posix_memalign((void **)&c.rbuf, DBLOCK, DREGION)) {
        say("INFO diskcheck: out of memory\n");
        sleep_forever();
    }
    say("INFO diskcheck every %g s over %zu MiB regions of %s (%lu MiB)\n", period, d->nregions,
        DISK_DEV, (unsigned long)(d->size >> 20));
    for (double next = now_s();; sleep_until(next)) {
        next = now_s() + period;
        disk_round(d, &c);
    }
}

/* Rewrite the diskdirty area at rate_mib MiB/s, like the memory dirtier (10 ms slices). */
static void disk_dirty(struct disk *d, double rate_mib)
{
    const double rate = rate_mib * MiB;
    uint64_t *buf, s = seed(), pos = d->dirty_off;
    if (posix_memalign((void **)&buf, DBLOCK, DDIRTY_CHUNK)) {
        say("INFO diskdirty: out of memory\n");
        sleep_forever();
    }
    say("INFO diskdirty %.1f MiB/s over %lu MiB of %s\n", rate_mib,
        (unsigned long)((d->dirty_end - d->dirty_off) >> 20), DISK_DEV);
    double base = now_s(), credited = 0, win_t = base, win_bytes = 0;
    int failed = 0;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        double t = now_s(), allowed = (t - base) * rate;
        if (allowed - credited > rate * DEBT_S)
            credited = allowed - rate * DEBT_S;
        double slice_end = t + SLICE_NS / 1e9;
        while (credited + DBLOCK <= allowed && now_s() < slice_end) {
            uint64_t len = (uint64_t)(allowed - credited) / DBLOCK * DBLOCK;
            if (len > DDIRTY_CHUNK)
                len = DDIRTY_CHUNK;
            if (len > d->dirty_end - pos)
                len = d->dirty_end - pos;
            for (size_t w = 0; w < len / sizeof(uint64_t); w++)
                buf[w] = xorshift64s(&s);
            size_t n = dio(d->fd, 1, buf, len, pos);
            if (n < len && !failed++)
                say("INFO diskdirty: write at %lu failed: %s\n", (unsigned long)pos,
                    strerror(errno));
            pos = pos + len < d->dirty_end ? pos + len : d->dirty_off;
            credited += len;
            win_bytes += n;
        }
        t = now_s();
        if (t - win_t >= REPORT_S) {
            say("DISKDIRTY %.1f\n", win_bytes / MiB / (t - win_t));
            win_t = t;
            win_bytes = 0;
        }
        ts_add_ns(&next, SLICE_NS);
        struct timespec cur;
        clock_gettime(CLOCK_MONOTONIC, &cur);
        if (ts_before(&next, &cur))
            next = cur;
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
}

/* The disk process: open /dev/vda, then the check here and the dirtier in a child. */
static void disk_worker(double check_s, double dirty_mib)
{
    setpriority(PRIO_PROCESS, 0, 19);
    struct disk d = {.fd = -1};
    double until = now_s() + DISK_WAIT_S;
    for (;;) {
        int loaded = access(MODULES_DONE, F_OK) == 0; /* before the open: no race with /init */
        d.fd = open(DISK_DEV, O_RDWR | O_DIRECT | O_CLOEXEC);
        if (d.fd >= 0 || errno != ENOENT || loaded || now_s() >= until)
            break;
        usleep(20000);
    }
    if (d.fd < 0)
        say("INFO %s: %s\n", DISK_DEV, strerror(errno));
    else if (ioctl(d.fd, BLKGETSIZE64, &d.size) != 0 || d.size < 2 * DREGION)
        say("INFO %s: %lu bytes, at least 2 MiB needed\n", DISK_DEV, (unsigned long)d.size);
    else
        d.nregions = d.size / 2 / DREGION;
    if (!d.nregions) {
        say("DISKCHECK FAIL no disk\n");
        sleep_forever();
    }
    if (d.nregions > DCHECK_MAX_REGIONS)
        d.nregions = DCHECK_MAX_REGIONS;
    d.dirty_off = d.nregions * DREGION;
    d.dirty_end = d.size & ~(DBLOCK - 1);

    if (dirty_mib > 0 && check_s <= 0)
        disk_dirty(&d, dirty_mib);
    if (dirty_mib > 0) {
        pid_t p = fork(); /* the check and the dirtier each at their own pace */
        if (p == 0)
            disk_dirty(&d, dirty_mib);
        if (p < 0)
            say("INFO fork failed: %s\n", strerror(errno));
    }
    if (check_s > 0)
        disk_check(&d, check_s);
    sleep_forever();
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
    double diskcheck = cmdline_num("diskcheck"), diskdirty = cmdline_num("diskdirty");
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
    if (diskcheck > 0 || diskdirty > 0) {
        pid_t p = fork();
        if (p == 0) {
            disk_worker(diskcheck, diskdirty);
            _exit(0);
        }
        if (p < 0)
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
