# cython: language_level=3
"""The SSD tier's compiled read path: READs answered from disk-tier entries by C threads.

A FUSE READ of a small file through Python costs about 150 us of the daemon's one event-loop
thread (a coroutine, the tiers' lookups, the range read and its sums, the reply); measured, that
thread, not the disk, bounds a shuffled pass over small files in the SSD tier. A large file's
1 MiB READ through Python costs a core's worth of kernel time at 1 GB/s (each chunk read into a
fresh 4 MiB buffer: page faults, zeroing, unmapping), where the disk gives more. This engine
takes READs before Python sees them, through the read hook of cachefs's pyfuse3 patch
(`pyfuse3.set_read_hook`): the hook runs on the event loop's thread and only looks the inode
up, maps the range onto the file's extents and queues the request; worker threads (no GIL, no
Python) open each entry file, read and check its sub-blocks against the entry's sums, and reply
with libfuse's thread-safe `fuse_reply_iov`. The kernel work of a READ (the copy out of the page
cache, the reply's copy into the kernel) thereby runs on every core instead of the one. A small
file's READ whose bytes are in the page cache (its pack asked for whole by an earlier READ) is
answered by the hook itself, on the event loop's thread: it reads with RWF_NOWAIT, which never
waits for the disk (what the page cache lacks goes to a worker, told so). Measured on shuffled
SSD passes over 20,000 small files (entries evicted first; three rounds, interleaved), that
saved a worker's wake-up per READ: 6,334-7,667 files/s against 5,776-7,020 with every READ
queued.

It reads the disk tier's layout, which `cachefs.cache.disk` defines and passes to `start`: the
entry of chunk H is ``<objects>/chunks/<H[:2]>/<H>``, its sums the extended attribute
``user.cachefs.sums`` (version, log2 of the sub-block size, the object's length, then one
little-endian CRC-32 per sub-block). Its policy is the tier's too. A small file (one piece of a
pack): the sub-blocks covering the range are read through the page cache; when they are not all
cached, the whole entry is asked for once the range is read and answered (so the reader does
not wait behind the whole pack's I/O: two prefetcher threads read queued packs into the page
cache one at a time each) unless the page cache has been evicting recently met entries (then
only the range, with POSIX_FADV_RANDOM). A large file (one
of many chunks, read as a stream, the kernel's readahead sending several READs at once): a
piece of `direct_min` bytes or more that the page cache lacks is read with O_DIRECT into the
worker's buffer, reused from READ to READ (the mount's pages of the file cache it above; a
second copy in the page cache would halve what memory holds), and a READ over a chunk that
Python's memory tier holds, or is fetching, is left to Python, which answers it from memory
(`leave_to_python`). A hit refreshes the entry's mtime (its recency) at most once per touch
interval; an entry whose sub-block fails its sum is deleted (if it is still the same file) and
counted corrupt.

Whatever the engine cannot answer it hands back, never answers wrong: an entry that is absent
(not fetched yet, evicted), without valid sums (an older daemon's, read whole and given sums by
Python), corrupt (deleted here), an extent that does not fit its entry, an I/O error; a READ
over one such chunk hands the whole READ back. Handed-back requests are queued with a reason
and an eventfd is signalled; the mount's event loop takes them (`take_handed_back`) and answers
them through the normal path (`pyfuse3.read_by_inode`), which fetches from the origin. A full
queue, or a READ over more than FR_PIECES chunks, is declined by the hook: Python answers it
at once.

Only inodes registered (`register`, with their extents) are taken; the table is touched only
with the GIL held (registration and the hook both run on the event loop's thread), and a
queued request carries its own copy of the pieces it reads. `stop` answers or hands back
everything queued before it returns, so the FUSE session may end after it. One engine per
process (a mount daemon serves one mount).
"""

from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #ifndef _GNU_SOURCE
    #define _GNU_SOURCE
    #endif
    #include <dlfcn.h>
    #include <errno.h>
    #include <fcntl.h>
    #include <limits.h>
    #include <stddef.h>
    #include <pthread.h>
    #include <stdint.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/eventfd.h>
    #include <sys/stat.h>
    #include <sys/sendfile.h>
    #include <sys/syscall.h>
    #include <sys/uio.h>
    #include <sys/xattr.h>
    #include <time.h>
    #include <unistd.h>

    #ifndef SYS_cachestat
    #define SYS_cachestat 451  /* the same number on every architecture */
    #endif

    typedef int (*fr_reply_buf_t)(void *req, const char *buf, size_t size);
    typedef int (*fr_reply_iov_t)(void *req, const struct iovec *iov, int count);
    typedef int (*fr_reply_err_t)(void *req, int err);
    typedef unsigned long (*fr_crc32_t)(unsigned long crc, const unsigned char *buf,
                                        unsigned int len);
    typedef uint32_t (*fr_isal_crc32_t)(uint32_t crc, const unsigned char *buf, uint64_t len);

    enum { FR_ABSENT = 1, FR_NO_SUMS = 2, FR_CORRUPT = 3, FR_BAD_EXTENT = 4, FR_IO_ERROR = 5,
           FR_WOULD_BLOCK = 6 /* inline only: not in the page cache, for a worker */ };
    #define FR_QUEUE 4096
    #define FR_SUMS_HEADER 12
    #define FR_HEX 64

    #define FR_PIECES 8  /* a READ over more chunks than this is left to Python */
    #define FR_PREFETCHERS 2  /* whole packs being read at once */
    #define FR_PF_QUEUE 256
    #define FR_ALIGN 4096  /* O_DIRECT's alignment of buffers, offsets and lengths */
    #define FR_KEY_PREFIX "chunks/"

    /* One extent of a file: `length` bytes at `offset` of chunk `hex`, at `file_off` in the
       file; hex[0] == 0: a chunk of zeros (never stored) */
    typedef struct { uint64_t file_off, offset, length; char hex[FR_HEX]; } fr_extent;
    /* A registered file: `n` extents tiling it from 0 (inline when one, else `many`);
       `large`: read as a stream (see fr_serve), not as a small file in a pack */
    typedef struct { uint64_t ino; uint32_t n; int large; fr_extent one; fr_extent *many; } fr_file;
    /* bytes [start, end) of chunk `hex`, whose extent ends at `ext_end` in it */
    typedef struct { uint64_t ext_end, start, end; char hex[FR_HEX]; } fr_piece;
    /* `uncached`: the hook found the page cache without the bytes (its failed RWF_NOWAIT read
       may have started their I/O since, so the worker must not ask the page cache again) */
    typedef struct { void *req; uint64_t ino, size, read_off; int large, uncached, n; fr_piece p[FR_PIECES]; } fr_job;
    typedef struct { void *req; uint64_t ino, size, read_off; int reason; } fr_back;
    typedef struct { unsigned char *buf; size_t cap; } fr_buffer;  /* FR_ALIGN-aligned */

    typedef struct {
        uint64_t reads, read_bytes, hits, hit_bytes, range_reads, bytes_read, corrupt,
                 prefetches, prefetches_skipped, handed_back, declined, touches, direct_reads,
                 left_to_python, inline_reads, prefetches_dropped;
    } fr_counters;

    static struct {
        int running, stopping;
        char objects[PATH_MAX];
        char xattr[64];
        int sums_version, base_shift, max_sub_blocks;
        int64_t touch_interval_ns;
        double eviction_limit, eviction_weight, eviction_rate;
        int cachestat_works;
        int efd;
        int inline_reads;  /* the hook answers a small file's READ itself when cached (0 once
                              RWF_NOWAIT is refused) */
        fr_buffer hook_buffer;  /* the hook's (one thread: the event loop's) */
        uint64_t direct_min;  /* a large file's piece of this many bytes or more, not cached,
                                 is read with O_DIRECT; 0: never (set to 0 if refused) */
        fr_reply_buf_t reply_buf;
        fr_reply_iov_t reply_iov;
        fr_reply_err_t reply_err;
        /* the Python maps (dicts) of keys that Python answers faster than the disk: a large
           file's READ over one of them is left to Python; borrowed, GIL-only */
        PyObject *py_maps[2];
        int py_maps_n;
        fr_crc32_t crc32;  /* zlib's, where ISA-L's is not found */
        fr_isal_crc32_t isal_crc32;  /* the same CRC-32, 5-8x faster */
        /* the inode table: linear probing, ino 0 marks a free slot; GIL-only */
        fr_file *table;
        size_t table_cap, table_count;
        /* the job queue and its workers */
        pthread_mutex_t lock;
        pthread_cond_t wake;
        fr_job queue[FR_QUEUE];
        size_t q_head, q_len;
        pthread_t *threads;
        int nthreads;
        /* handed back to Python */
        pthread_mutex_t back_lock;
        fr_back *back;
        size_t back_len, back_cap;
        pthread_mutex_t rate_lock;
        /* packs asked for whole, for the prefetchers */
        pthread_mutex_t pf_lock;
        pthread_cond_t pf_wake;
        char pf_queue[FR_PF_QUEUE][FR_HEX];
        size_t pf_head, pf_len;
        pthread_t pf_threads[FR_PREFETCHERS];
        int npf, pf_stopping, devnull;
        fr_counters c;
    } fr = { .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
             .back_lock = PTHREAD_MUTEX_INITIALIZER, .rate_lock = PTHREAD_MUTEX_INITIALIZER,
             .pf_lock = PTHREAD_MUTEX_INITIALIZER, .pf_wake = PTHREAD_COND_INITIALIZER,
             .efd = -1, .devnull = -1 };

    #define FR_ADD(field, n) __atomic_fetch_add(&fr.c.field, (uint64_t)(n), __ATOMIC_RELAXED)

    /* ---- the inode table (GIL held) ---- */
    static size_t fr_slot(uint64_t ino) {
        return (size_t)((ino * 0x9E3779B97F4A7C15ull) >> 17) & (fr.table_cap - 1);
    }
    static fr_file *fr_find(uint64_t ino) {
        if (!fr.table) return NULL;
        for (size_t i = fr_slot(ino);; i = (i + 1) & (fr.table_cap - 1)) {
            if (fr.table[i].ino == ino) return &fr.table[i];
            if (fr.table[i].ino == 0) return NULL;
        }
    }
    static int fr_grow(void) {
        size_t cap = fr.table_cap ? fr.table_cap * 2 : 1024;
        fr_file *old = fr.table, *t = calloc(cap, sizeof(fr_file));
        size_t oldcap = fr.table_cap;
        if (!t) return -1;
        fr.table = t; fr.table_cap = cap;
        for (size_t i = 0; i < oldcap; i++) {
            if (!old[i].ino) continue;
            size_t j = fr_slot(old[i].ino);
            while (t[j].ino) j = (j + 1) & (cap - 1);
            t[j] = old[i];
        }
        free(old);
        return 0;
    }
    static void fr_free_extents(fr_file *f) {
        if (f->n > 1) free(f->many);
        f->many = NULL;
    }
    /* `extents` (n of them, tiling the file) is taken over when n > 1 (malloc'd) */
    static int fr_register(uint64_t ino, fr_extent *extents, uint32_t n, int large) {
        if (ino == 0 || n == 0) return -1;
        fr_file *f = fr_find(ino);
        if (!f) {
            if ((fr.table_count + 1) * 2 > fr.table_cap && fr_grow()) return -1;
            size_t i = fr_slot(ino);
            while (fr.table[i].ino) i = (i + 1) & (fr.table_cap - 1);
            f = &fr.table[i];
            fr.table_count++;
        } else {
            fr_free_extents(f);
        }
        f->ino = ino; f->n = n; f->large = large;
        if (n == 1) f->one = extents[0];
        else f->many = extents;
        return 0;
    }
    static void fr_unregister(uint64_t ino) {
        fr_file *f = fr_find(ino);
        if (!f) return;
        fr_free_extents(f);
        /* backward-shift deletion: no tombstones, probes stay short */
        size_t mask = fr.table_cap - 1, i = (size_t)(f - fr.table), j = i;
        for (;;) {
            j = (j + 1) & mask;
            if (!fr.table[j].ino) break;
            size_t home = fr_slot(fr.table[j].ino);
            /* move j back to i unless its home lies cyclically in (i, j] */
            if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
                fr.table[i] = fr.table[j];
                i = j;
            }
        }
        fr.table[i].ino = 0;
        fr.table[i].n = 0;
        fr.table[i].many = NULL;
        fr.table_count--;
    }
    static void fr_clear_table(void) {
        for (size_t i = 0; i < fr.table_cap; i++)
            if (fr.table[i].ino) fr_free_extents(&fr.table[i]);
        free(fr.table); fr.table = NULL; fr.table_cap = fr.table_count = 0;
    }
    static const fr_extent *fr_extents(const fr_file *f) { return f->n == 1 ? &f->one : f->many; }

    /* ---- handing back ---- */
    static void fr_hand_back(const fr_job *j, int reason) {
        pthread_mutex_lock(&fr.back_lock);
        if (fr.back_len == fr.back_cap) {
            size_t cap = fr.back_cap ? fr.back_cap * 2 : 256;
            fr_back *b = realloc(fr.back, cap * sizeof(fr_back));
            if (!b) {  /* no memory even for this: answer EIO rather than never */
                pthread_mutex_unlock(&fr.back_lock);
                fr.reply_err(j->req, EIO);
                return;
            }
            fr.back = b; fr.back_cap = cap;
        }
        fr_back *b = &fr.back[fr.back_len++];
        b->req = j->req; b->ino = j->ino; b->size = j->size; b->read_off = j->read_off;
        b->reason = reason;
        pthread_mutex_unlock(&fr.back_lock);
        FR_ADD(handed_back, 1);
        uint64_t one = 1;
        ssize_t ignored = write(fr.efd, &one, sizeof one);
        (void)ignored;
    }

    /* ---- the page cache ---- */
    struct fr_cachestat_range { uint64_t off, len; };
    struct fr_cachestat { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted,
                          nr_recently_evicted; };
    static int fr_cachestat(int fd, uint64_t off, uint64_t len, struct fr_cachestat *out) {
        if (!__atomic_load_n(&fr.cachestat_works, __ATOMIC_RELAXED)) return -1;
        long page = sysconf(_SC_PAGESIZE);
        uint64_t first = off / page, last = (off + len + page - 1) / page;
        struct fr_cachestat_range r = { first * page, (last - first) * page };
        if (syscall(SYS_cachestat, fd, &r, out, 0) == 0) return 0;
        if (errno == ENOSYS || errno == EPERM)
            __atomic_store_n(&fr.cachestat_works, 0, __ATOMIC_RELAXED);
        return -1;
    }
    /* 1: every page cached; 0: not; -1: cannot tell */
    static int fr_fully_cached(int fd, uint64_t off, uint64_t len) {
        struct fr_cachestat cs;
        if (fr_cachestat(fd, off, len, &cs)) return -1;
        long page = sysconf(_SC_PAGESIZE);
        uint64_t pages = (off + len + page - 1) / page - off / page;
        return cs.nr_cache >= pages;
    }
    /* as DiskCache._prefetch_decision: whether to ask for the whole entry (the caller does,
       after its reply), unless reclaim has been evicting: then only the range is read, without
       the kernel's readahead around it */
    static int fr_prefetch_decision(int fd, uint64_t size) {
        struct fr_cachestat cs;
        int evicted = fr_cachestat(fd, 0, size, &cs) == 0 && cs.nr_evicted > 0;
        pthread_mutex_lock(&fr.rate_lock);
        fr.eviction_rate = fr.eviction_rate * (1 - fr.eviction_weight)
                           + fr.eviction_weight * evicted;
        int prefetch = !evicted && fr.eviction_rate < fr.eviction_limit;
        pthread_mutex_unlock(&fr.rate_lock);
        if (prefetch) {
            FR_ADD(prefetches, 1);
        } else {
            FR_ADD(prefetches_skipped, 1);
            posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
        }
        return prefetch;
    }

    static uint32_t fr_crc(const unsigned char *buf, uint64_t len) {
        if (fr.isal_crc32) return fr.isal_crc32(0, buf, len);
        return (uint32_t)fr.crc32(0, buf, (unsigned int)len);
    }

    static int fr_shift_for(uint64_t size) {
        int shift = fr.base_shift;
        while (((size + (1ull << shift) - 1) >> shift) > (uint64_t)fr.max_sub_blocks) shift++;
        return shift;
    }
    static uint64_t fr_le(const unsigned char *p, int n) {
        uint64_t v = 0;
        for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
        return v;
    }

    static void fr_drop_corrupt(const char *path, const struct stat *st) {
        struct stat now;
        FR_ADD(corrupt, 1);
        if (stat(path, &now) == 0 && now.st_dev == st->st_dev && now.st_ino == st->st_ino)
            unlink(path);  /* not if a fresh copy replaced it since */
    }

    /* ---- whole packs, read in the background ---- */
    /* Asking the kernel for every pack at once (POSIX_FADV_WILLNEED as READs meet them)
       queued up to a whole data set's reads in the block layer at the start of an epoch, and
       each reader's own small read waited behind them: measured, first passes of 6-7 s
       against 2.5 s. So packs are read by FR_PREFETCHERS threads, one pack each at a time:
       WILLNEED (its I/O in one go), then a sendfile to /dev/null that waits until it is in the
       page cache without copying it. The queue is bounded; a pack that does not fit in it is
       read on demand. */
    static void fr_prefetch_later(const char *hex) {
        pthread_mutex_lock(&fr.pf_lock);
        for (size_t i = 0; i < fr.pf_len; i++) {
            if (!memcmp(fr.pf_queue[(fr.pf_head + i) % FR_PF_QUEUE], hex, FR_HEX)) {
                pthread_mutex_unlock(&fr.pf_lock);
                return;  /* already asked for */
            }
        }
        if (fr.pf_stopping || fr.npf == 0 || fr.pf_len == FR_PF_QUEUE) {
            pthread_mutex_unlock(&fr.pf_lock);
            FR_ADD(prefetches_dropped, 1);
            return;
        }
        memcpy(fr.pf_queue[(fr.pf_head + fr.pf_len) % FR_PF_QUEUE], hex, FR_HEX);
        fr.pf_len++;
        pthread_cond_signal(&fr.pf_wake);
        pthread_mutex_unlock(&fr.pf_lock);
    }
    static void *fr_prefetcher(void *unused) {
        (void)unused;
        for (;;) {
            char hex[FR_HEX], path[PATH_MAX];
            pthread_mutex_lock(&fr.pf_lock);
            while (!fr.pf_stopping && fr.pf_len == 0) pthread_cond_wait(&fr.pf_wake, &fr.pf_lock);
            if (fr.pf_stopping) { pthread_mutex_unlock(&fr.pf_lock); break; }
            memcpy(hex, fr.pf_queue[fr.pf_head], FR_HEX);
            fr.pf_head = (fr.pf_head + 1) % FR_PF_QUEUE;
            fr.pf_len--;
            pthread_mutex_unlock(&fr.pf_lock);
            if (snprintf(path, sizeof path, "%s/chunks/%.2s/%.64s", fr.objects, hex, hex)
                    >= (int)sizeof path) continue;
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;  /* evicted meanwhile */
            struct stat st;
            if (fstat(fd, &st) == 0) {
                posix_fadvise(fd, 0, st.st_size, POSIX_FADV_WILLNEED);
                off_t off = 0;
                while (fr.devnull >= 0 && off < st.st_size) {
                    ssize_t r = sendfile(fr.devnull, fd, &off, (size_t)(st.st_size - off));
                    if (r < 0 && errno == EINTR) continue;
                    if (r <= 0) break;
                }
            }
            close(fd);
        }
        return NULL;
    }

    /* ---- one request, on a worker thread ---- */

    /* room for `more` bytes after the first `used` of `b` (kept) */
    static int fr_reserve(fr_buffer *b, size_t used, size_t more) {
        if (used + more <= b->cap) return 0;
        size_t cap = b->cap ? b->cap : 1 << 20;
        while (cap < used + more) cap *= 2;
        void *fresh = NULL;
        if (posix_memalign(&fresh, FR_ALIGN, cap)) return -1;
        if (used) memcpy(fresh, b->buf, used);
        free(b->buf);
        b->buf = fresh; b->cap = cap;
        return 0;
    }
    static uint64_t fr_align_up(uint64_t n) { return (n + FR_ALIGN - 1) & ~(uint64_t)(FR_ALIGN - 1); }

    /* Read and check piece `p` of a request into `b` from `*used` on (advanced past it);
       its bytes start at `*at`. 0, or why to hand the request back. `*prefetch_fd`: an open
       fd of the entry whose whole pack the caller asks for after its reply (else -1), and
       `*prefetch_size` its size. */
    static int fr_read_piece(const fr_piece *p, int large, int nowait, int uncached,
                             fr_buffer *b, size_t *used, size_t *at, int *prefetch_fd,
                             uint64_t *prefetch_size) {
        char path[PATH_MAX];
        *prefetch_fd = -1;
        if (snprintf(path, sizeof path, "%s/chunks/%.2s/%.64s", fr.objects, p->hex, p->hex)
                >= (int)sizeof path) return FR_IO_ERROR;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return errno == ENOENT ? FR_ABSENT : FR_IO_ERROR;
        struct stat st;
        unsigned char raw[FR_SUMS_HEADER + 4 * 4096];
        ssize_t n;
        int reason = 0;
        if (fstat(fd, &st)) { reason = FR_IO_ERROR; goto out; }
        n = fgetxattr(fd, fr.xattr, raw, sizeof raw);
        uint64_t size = (uint64_t)st.st_size;
        int shift = n >= FR_SUMS_HEADER ? raw[1] : 0;
        if (n < FR_SUMS_HEADER || raw[0] != fr.sums_version || fr_le(raw + 4, 8) != size
                || shift != fr_shift_for(size)
                || (uint64_t)n != FR_SUMS_HEADER + 4 * ((size + (1ull << shift) - 1) >> shift)) {
            reason = FR_NO_SUMS;  /* Python reads it whole, verifies it and adds its sums */
            goto out;
        }
        if (p->ext_end > size) { reason = FR_BAD_EXTENT; goto out; }
        uint64_t first = (p->start >> shift) << shift;
        uint64_t stop = (((p->end - 1) >> shift) + 1) << shift;
        if (stop > size) stop = size;
        uint64_t want = stop - first;
        size_t room = (size_t)fr_align_up(want);
        if (nowait) {  /* the page cache's copy, or nothing (RWF_NOWAIT: no I/O) */
            if (fr_reserve(b, *used, room)) { reason = FR_IO_ERROR; goto out; }
            struct iovec v = { b->buf + *used, (size_t)want };
            ssize_t r;
            do r = preadv2(fd, &v, 1, (off_t)first, RWF_NOWAIT); while (r < 0 && errno == EINTR);
            if (r < 0 && errno == EOPNOTSUPP) __atomic_store_n(&fr.inline_reads, 0, __ATOMIC_RELAXED);
            if (r != (ssize_t)want) { reason = FR_WOULD_BLOCK; goto out; }
        }
        int cached = nowait ? 1 : uncached ? 0 : fr_fully_cached(fd, first, want);
        /* A large file's chunk streams through: read around the page cache (the mount's
           pages of the file hold it above), into this thread's buffer, reused. A small
           file's pack is read through it and asked for whole after the reply: its
           neighbours are wanted soon. */
        uint64_t direct_min = __atomic_load_n(&fr.direct_min, __ATOMIC_RELAXED);
        int direct = large && direct_min && want >= direct_min && cached == 0;
        if (!large && want < size && cached == 0 && fr_prefetch_decision(fd, size))
            *prefetch_fd = fd;
        if (fr_reserve(b, *used, room)) { reason = FR_IO_ERROR; goto out; }
        unsigned char *buf = b->buf + *used;
        if (direct && fcntl(fd, F_SETFL, O_DIRECT)) direct = 0;
        uint64_t got = nowait ? want : 0;
        while (got < want) {
            ssize_t r = pread(fd, buf + got, direct ? room - got : want - got, (off_t)(first + got));
            if (r < 0 && errno == EINTR) continue;
            if (r < 0 && direct && errno == EINVAL) {  /* refused here: through the cache */
                __atomic_store_n(&fr.direct_min, 0, __ATOMIC_RELAXED);
                direct = 0;
                if (fcntl(fd, F_SETFL, 0)) { reason = FR_IO_ERROR; goto out; }
                continue;
            }
            if (r < 0) { reason = FR_IO_ERROR; goto out; }
            if (r == 0) break;
            got += (uint64_t)r;
            if (direct && (got & (FR_ALIGN - 1))) break;  /* the end of the file */
        }
        if (got > want) got = want;
        FR_ADD(bytes_read, got);
        if (direct) FR_ADD(direct_reads, 1);
        uint64_t step = 1ull << shift;
        int intact = got == want;
        for (uint64_t pos = 0; intact && pos < want; pos += step) {
            uint64_t len = want - pos < step ? want - pos : step;
            uint64_t index = (first + pos) >> shift;
            intact = fr_crc(buf + pos, len) == (uint32_t)fr_le(raw + FR_SUMS_HEADER + 4 * index, 4);
        }
        if (!intact) {
            fr_drop_corrupt(path, &st);
            reason = FR_CORRUPT;
            goto out;
        }
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        int64_t age = (int64_t)(now.tv_sec - st.st_mtim.tv_sec) * 1000000000
                      + (now.tv_nsec - st.st_mtim.tv_nsec);
        if (age >= fr.touch_interval_ns) {
            FR_ADD(touches, 1);
            utimensat(AT_FDCWD, path, NULL, 0);  /* evicted meanwhile: nothing to do */
        }
        FR_ADD(range_reads, 1);
        FR_ADD(hits, 1);
        FR_ADD(hit_bytes, p->end - p->start);
        *at = *used + (size_t)(p->start - first);
        *used += room;
        if (*prefetch_fd >= 0) { *prefetch_size = size; return 0; }
    out:
        if (reason) *prefetch_fd = -1;
        close(fd);
        return reason;
    }

    /* 1: `nowait` and a piece is not in the page cache (nothing done: for a worker); else 0,
       the request answered or handed back */
    static int fr_serve(const fr_job *j, fr_buffer *b, int nowait) {
        struct iovec iov[FR_PIECES];
        size_t at[FR_PIECES];
        int prefetch_fd[FR_PIECES];
        uint64_t prefetch_size[FR_PIECES];
        size_t used = 0;
        uint64_t total = 0;
        int reason = 0, k;
        for (k = 0; k < j->n && !reason; k++) {
            const fr_piece *p = &j->p[k];
            prefetch_fd[k] = -1;
            if (p->hex[0] == 0) {  /* zeros */
                size_t len = (size_t)(p->end - p->start);
                if (fr_reserve(b, used, (size_t)fr_align_up(len))) { reason = FR_IO_ERROR; break; }
                memset(b->buf + used, 0, len);
                at[k] = used;
                used += (size_t)fr_align_up(len);
            } else {
                reason = fr_read_piece(p, j->large, nowait, j->uncached, b, &used, &at[k],
                                       &prefetch_fd[k], &prefetch_size[k]);
            }
        }
        if (reason == FR_WOULD_BLOCK) {
            for (int i = 0; i < k; i++) if (prefetch_fd[i] >= 0) close(prefetch_fd[i]);
            return 1;
        }
        if (!reason) {
            for (k = 0; k < j->n; k++) {
                iov[k].iov_base = b->buf + at[k];
                iov[k].iov_len = (size_t)(j->p[k].end - j->p[k].start);
                total += iov[k].iov_len;
            }
            FR_ADD(reads, 1);
            FR_ADD(read_bytes, total);
            if (j->n == 0) fr.reply_buf(j->req, "", 0);
            else fr.reply_iov(j->req, iov, j->n);
        }
        /* after the reply: the reader does not wait behind the whole pack's I/O */
        for (int i = 0; i < k; i++) {
            if (prefetch_fd[i] < 0) continue;
            if (!reason) fr_prefetch_later(j->p[i].hex);
            close(prefetch_fd[i]);
        }
        (void)prefetch_size;
        if (reason) fr_hand_back(j, reason);
        return 0;
    }

    static void *fr_worker(void *unused) {
        fr_buffer buffer = { NULL, 0 };
        (void)unused;
        for (;;) {
            pthread_mutex_lock(&fr.lock);
            while (!fr.stopping && fr.q_len == 0) pthread_cond_wait(&fr.wake, &fr.lock);
            if (fr.q_len == 0) { pthread_mutex_unlock(&fr.lock); break; }
            fr_job job = fr.queue[fr.q_head];
            fr.q_head = (fr.q_head + 1) % FR_QUEUE;
            fr.q_len--;
            pthread_mutex_unlock(&fr.lock);
            fr_serve(&job, &buffer, 0);
        }
        free(buffer.buf);
        return NULL;
    }

    /* whether Python has chunk `hex` in one of its maps (the memory tier, fetches in
       flight); GIL held. An error counts as yes: Python then answers, as it always can. */
    static int fr_python_has(const char *hex) {
        char key[sizeof FR_KEY_PREFIX - 1 + 3 + FR_HEX];
        size_t pre = sizeof FR_KEY_PREFIX - 1;
        memcpy(key, FR_KEY_PREFIX, pre);
        key[pre] = hex[0]; key[pre + 1] = hex[1]; key[pre + 2] = '/';
        memcpy(key + pre + 3, hex, FR_HEX);
        PyObject *k = PyUnicode_FromStringAndSize(key, (Py_ssize_t)sizeof key);
        if (!k) { PyErr_Clear(); return 1; }
        int has = 0;
        for (int i = 0; i < fr.py_maps_n && !has; i++) {
            int r = PyDict_Contains(fr.py_maps[i], k);
            if (r < 0) PyErr_Clear();
            has = r != 0;
        }
        Py_DECREF(k);
        return has;
    }

    /* pyfuse3's read hook: on the event loop's thread, GIL held; never waits for the disk's
       data: a small file's READ whose bytes the page cache holds is answered right here
       (preadv2 with RWF_NOWAIT, no I/O), which spares a worker's wake-up and two context
       switches per READ; anything else is queued */
    static int fr_hook(void *req, uint64_t ino, size_t size, off_t off) {
        if (!fr.running || off < 0) return 0;
        fr_file *f = fr_find(ino);
        if (!f) return 0;
        fr_job j;
        j.req = req; j.ino = ino; j.size = size; j.read_off = (uint64_t)off;
        j.large = f->large; j.uncached = 0; j.n = 0;
        const fr_extent *x = fr_extents(f);
        uint64_t pos = (uint64_t)off, stop = pos + size;
        uint32_t lo = 0, hi = f->n;  /* the first extent that ends after pos */
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo) / 2;
            if (x[mid].file_off + x[mid].length <= pos) lo = mid + 1; else hi = mid;
        }
        for (uint32_t i = lo; i < f->n && pos < stop; i++) {
            const fr_extent *e = &x[i];
            uint64_t within = pos - e->file_off;
            uint64_t take = e->length - within < stop - pos ? e->length - within : stop - pos;
            if (j.n == FR_PIECES) { FR_ADD(declined, 1); return 0; }
            /* a large file's chunk that Python holds in memory (or is fetching) is faster
               there: the memory tier is not below the disk */
            if (f->large && e->hex[0] && fr.py_maps_n && fr_python_has(e->hex)) {
                FR_ADD(left_to_python, 1);
                return 0;
            }
            fr_piece *p = &j.p[j.n++];
            memcpy(p->hex, e->hex, FR_HEX);
            p->ext_end = e->offset + e->length;
            p->start = e->offset + within;
            p->end = p->start + take;
            pos += take;
        }
        if (!j.large && j.n == 1 && __atomic_load_n(&fr.inline_reads, __ATOMIC_RELAXED)
                && (j.uncached = fr_serve(&j, &fr.hook_buffer, 1)) == 0) {
            FR_ADD(inline_reads, 1);
            return 1;
        }
        pthread_mutex_lock(&fr.lock);
        if (fr.stopping || fr.q_len == FR_QUEUE) {
            pthread_mutex_unlock(&fr.lock);
            FR_ADD(declined, 1);
            return 0;
        }
        fr_job *q = &fr.queue[(fr.q_head + fr.q_len) % FR_QUEUE];
        memcpy(q, &j, offsetof(fr_job, p) + (size_t)j.n * sizeof(fr_piece));
        fr.q_len++;
        pthread_cond_signal(&fr.wake);
        pthread_mutex_unlock(&fr.lock);
        return 1;
    }

    static const char *fr_start(const char *objects, const char *xattr, const char *isal,
                                int sums_version,
                                int base_shift, int max_sub_blocks, int64_t touch_interval_ns,
                                double eviction_limit, double eviction_weight,
                                uint64_t direct_min, int nthreads) {
        if (fr.running) return "already running in this process";
        void *fuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
        if (!fuse) return "libfuse3 is not loaded (pyfuse3 loads it)";
        fr.reply_buf = (fr_reply_buf_t)dlsym(fuse, "fuse_reply_buf");
        fr.reply_iov = (fr_reply_iov_t)dlsym(fuse, "fuse_reply_iov");
        fr.reply_err = (fr_reply_err_t)dlsym(fuse, "fuse_reply_err");
        /* ISA-L's CRC-32 from the isal module the disk tier already loaded (it exports its
           symbols), else zlib's: the same CRC-32 (zlib's crc32 with 0 as the start value) */
        void *fast = isal[0] ? dlopen(isal, RTLD_NOW | RTLD_NOLOAD) : NULL;
        fr.isal_crc32 = fast ? (fr_isal_crc32_t)dlsym(fast, "crc32_gzip_refl") : NULL;
        void *z = fr.isal_crc32 ? NULL : dlopen("libz.so.1", RTLD_NOW);
        fr.crc32 = z ? (fr_crc32_t)dlsym(z, "crc32") : NULL;
        if (!fr.reply_buf || !fr.reply_iov || !fr.reply_err)
            return "libfuse3 lacks fuse_reply_buf or fuse_reply_iov";
        if (!fr.isal_crc32 && !fr.crc32) return "no CRC-32 (neither ISA-L nor libz.so.1)";
        if (snprintf(fr.objects, sizeof fr.objects, "%s", objects) >= (int)sizeof fr.objects
                || snprintf(fr.xattr, sizeof fr.xattr, "%s", xattr) >= (int)sizeof fr.xattr)
            return "path too long";
        fr.sums_version = sums_version; fr.base_shift = base_shift;
        fr.max_sub_blocks = max_sub_blocks; fr.touch_interval_ns = touch_interval_ns;
        fr.eviction_limit = eviction_limit; fr.eviction_weight = eviction_weight;
        fr.eviction_rate = 0; fr.cachestat_works = 1; fr.direct_min = direct_min;
        fr.inline_reads = 1;
        memset(&fr.c, 0, sizeof fr.c);
        fr.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (fr.efd < 0) return "eventfd failed";
        fr.threads = calloc((size_t)nthreads, sizeof(pthread_t));
        if (!fr.threads) { close(fr.efd); fr.efd = -1; return "no memory"; }
        fr.stopping = 0; fr.q_head = fr.q_len = 0;
        for (fr.nthreads = 0; fr.nthreads < nthreads; fr.nthreads++) {
            if (pthread_create(&fr.threads[fr.nthreads], NULL, fr_worker, NULL)) break;
        }
        if (fr.nthreads == 0) {
            free(fr.threads); fr.threads = NULL; close(fr.efd); fr.efd = -1;
            return "could not start a thread";
        }
        fr.devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
        fr.pf_stopping = 0; fr.pf_head = fr.pf_len = 0;
        for (fr.npf = 0; fr.npf < FR_PREFETCHERS; fr.npf++) {
            if (pthread_create(&fr.pf_threads[fr.npf], NULL, fr_prefetcher, NULL)) break;
        }
        fr.running = 1;
        return NULL;
    }

    /* every queued request answered or handed back when it returns */
    static void fr_stop(void) {
        if (!fr.running) return;
        pthread_mutex_lock(&fr.lock);
        fr.stopping = 1;
        pthread_cond_broadcast(&fr.wake);
        pthread_mutex_unlock(&fr.lock);
        for (int i = 0; i < fr.nthreads; i++) pthread_join(fr.threads[i], NULL);
        free(fr.threads); fr.threads = NULL; fr.nthreads = 0;
        pthread_mutex_lock(&fr.pf_lock);
        fr.pf_stopping = 1;
        pthread_cond_broadcast(&fr.pf_wake);
        pthread_mutex_unlock(&fr.pf_lock);
        for (int i = 0; i < fr.npf; i++) pthread_join(fr.pf_threads[i], NULL);
        fr.npf = 0;
        if (fr.devnull >= 0) close(fr.devnull);
        fr.devnull = -1;
        free(fr.hook_buffer.buf); fr.hook_buffer.buf = NULL; fr.hook_buffer.cap = 0;
        fr.running = 0;
        fr.py_maps_n = 0;
        fr_clear_table();
    }
    static void fr_close_eventfd(void) {
        if (fr.efd >= 0) close(fr.efd);
        fr.efd = -1;
    }
    static void *fr_hook_pointer(void) { return (void *)fr_hook; }

    /* the handed-back requests, moved out (GIL held) */
    static fr_back *fr_take_back(size_t *count) {
        pthread_mutex_lock(&fr.back_lock);
        fr_back *b = fr.back;
        *count = fr.back_len;
        fr.back = NULL; fr.back_len = fr.back_cap = 0;
        pthread_mutex_unlock(&fr.back_lock);
        return b;
    }
    static int fr_uses_isal(void) { return fr.isal_crc32 != NULL; }
    static uint64_t fr_counter(int i) {
        return __atomic_load_n(((uint64_t *)&fr.c) + i, __ATOMIC_RELAXED);
    }
    """
    ctypedef struct fr_back:
        void *req
        uint64_t ino
        uint64_t size
        uint64_t read_off
        int reason
    ctypedef struct fr_extent:
        uint64_t file_off
        uint64_t offset
        uint64_t length
        char hex[64]
    ctypedef struct fr_file:
        uint64_t ino
        unsigned int n
        int large
    fr_file *fr_find(uint64_t ino)
    const fr_extent *fr_extents(const fr_file *f)
    int fr_register(uint64_t ino, fr_extent *extents, unsigned int n, int large)
    void fr_unregister(uint64_t ino)
    const char *fr_start(const char *objects, const char *xattr, const char *isal,
                         int sums_version,
                         int base_shift, int max_sub_blocks, long long touch_interval_ns,
                         double eviction_limit, double eviction_weight, uint64_t direct_min,
                         int nthreads)
    void fr_stop() nogil
    void fr_close_eventfd()
    void *fr_hook_pointer()
    fr_back *fr_take_back(size_t *count)
    uint64_t fr_counter(int i)
    int fr_uses_isal()
    int fr_running "fr.running"
    int fr_py_maps_n "fr.py_maps_n"
    void *fr_py_maps "fr.py_maps"
    int fr_efd "fr.efd"
    size_t fr_table_count "fr.table_count"

cdef extern from "stdlib.h":
    void free(void *p)
    void *malloc(size_t size)

cdef extern from "string.h":
    void *memcpy(void *dest, const void *src, size_t n)

from cpython.pycapsule cimport PyCapsule_New
from cpython.ref cimport PyObject

# Why a request was handed back (the reason in `take_handed_back`).
ABSENT = 1  # no entry (not fetched yet, or evicted)
NO_SUMS = 2  # an entry without valid sums (an older daemon's): Python reads it whole
CORRUPT = 3  # a sub-block failed its sum: the entry was deleted
BAD_EXTENT = 4  # the file's extent does not fit its chunk's entry
IO_ERROR = 5
REASONS = {ABSENT: "absent", NO_SUMS: "no sums", CORRUPT: "corrupt", BAD_EXTENT: "bad extent",
           IO_ERROR: "I/O error"}
COUNTERS = ("reads", "read_bytes", "hits", "hit_bytes", "range_reads", "bytes_read", "corrupt",
            "prefetches", "prefetches_skipped", "handed_back", "declined", "touches",
            "direct_reads", "left_to_python", "inline_reads", "prefetches_dropped")
# The maps `leave_to_python` named, kept alive while the engine looks keys up in them.
_python_maps: tuple = ()


def start(str objects, str xattr, str isal, int sums_version, int base_shift,
          int max_sub_blocks, long long touch_interval_ns, double eviction_limit,
          double eviction_weight, uint64_t direct_min, int threads):
    """Start the engine's `threads` workers over the entries under `objects`; returns the
    eventfd that is signalled when requests are handed back. `isal`: the path of a loaded
    module exporting ISA-L's crc32_gzip_refl ("" or not found: zlib's crc32). `direct_min`: a
    large file's range of this many bytes or more that the page cache lacks is read with
    O_DIRECT (0: never). RuntimeError if it cannot run (already running, libfuse3 not
    loaded, no CRC-32)."""
    if threads < 1:
        raise ValueError("threads must be at least 1")
    objects_b = objects.encode()
    xattr_b = xattr.encode()
    isal_b = isal.encode()
    cdef const char *error = fr_start(objects_b, xattr_b, isal_b, sums_version, base_shift,
                                      max_sub_blocks, touch_interval_ns, eviction_limit,
                                      eviction_weight, direct_min, threads)
    if error != NULL:
        raise RuntimeError(error.decode())
    return fr_efd


def stop():
    """Stop taking requests, answer or hand back every queued one, join the workers and forget
    every registered inode. The eventfd stays open until `close_eventfd`."""
    global _python_maps
    with nogil:
        fr_stop()
    _python_maps = ()


def leave_to_python(*maps):
    """READs of large files over a chunk whose key (``chunks/ab/<hash>``) is in one of these
    dicts are left to Python (the hook declines them): the memory tier's entries and the
    fetches in flight, live. At most two; replaces those given before."""
    global _python_maps
    if len(maps) > 2 or not all(isinstance(m, dict) for m in maps):
        raise TypeError("at most two dicts")
    cdef PyObject **slots = <PyObject **> fr_py_maps
    cdef int i
    _python_maps = maps
    for i in range(len(maps)):
        slots[i] = <PyObject *> maps[i]
    global fr_py_maps_n
    fr_py_maps_n = len(maps)


def close_eventfd():
    fr_close_eventfd()


def running():
    return bool(fr_running)


def hook_capsule():
    """The hook, for `pyfuse3.set_read_hook`."""
    return PyCapsule_New(fr_hook_pointer(), b"pyfuse3.read_hook", NULL)


def register(uint64_t ino, extents, bint large=False):
    """Let the engine answer READs of inode `ino`, a file made of `extents`, a sequence of
    (chunk, offset, length) in file order (`length` bytes at `offset` of chunk `chunk`, 64 hex
    characters, or "" for a chunk of zeros). `large`: read as a stream (around the page cache,
    left to Python where its memory tier has the chunk) rather than as a small file of a pack.
    Registering an inode again replaces its record."""
    cdef Py_ssize_t n = len(extents)
    if n == 0 or n > 0xFFFFFFFF:
        raise ValueError("a file of 1 to 2**32 - 1 extents")
    cdef fr_extent *xs = <fr_extent *> malloc(n * sizeof(fr_extent))
    if xs == NULL:
        raise MemoryError()
    cdef uint64_t file_off = 0
    cdef Py_ssize_t i
    cdef bytes hex_b
    try:
        for i in range(n):
            chunk, offset, length = extents[i]
            if chunk and len(chunk) != 64:
                raise ValueError(f"not a chunk name: {chunk!r}")
            if length <= 0:
                raise ValueError(f"an empty extent: {extents[i]!r}")
            hex_b = chunk.encode("ascii") if chunk else bytes(64)
            xs[i].file_off = file_off
            xs[i].offset = offset
            xs[i].length = length
            memcpy(xs[i].hex, <const char *> hex_b, 64)
            file_off += length
    except BaseException:
        free(xs)
        raise
    cdef fr_extent one
    if n == 1:
        one = xs[0]
        free(xs)
        if fr_register(ino, &one, 1, large):
            raise MemoryError("the inode table cannot grow")
    elif fr_register(ino, xs, <unsigned int> n, large):
        free(xs)
        raise MemoryError("the inode table cannot grow")


def unregister(uint64_t ino):
    fr_unregister(ino)


def registered():
    """How many inodes are registered."""
    return fr_table_count


def lookup(uint64_t ino):
    """The record of `ino`: (extents, large) as `register` took them, or None."""
    cdef fr_file *f = fr_find(ino)
    if f == NULL:
        return None
    cdef const fr_extent *xs = fr_extents(f)
    extents = tuple((xs[i].hex[:64].decode("ascii") if xs[i].hex[0] else "",
                     xs[i].offset, xs[i].length) for i in range(f.n))
    return extents, bool(f.large)


def take_handed_back():
    """The requests handed back since the last call: (request address, inode, size, offset,
    reason), each to be answered once (pyfuse3.read_by_inode)."""
    cdef size_t count = 0
    cdef fr_back *back = fr_take_back(&count)
    out = [(<size_t> back[i].req, back[i].ino, back[i].size, back[i].read_off, back[i].reason)
           for i in range(count)]
    free(back)
    return out


def counters():
    """The engine's counters since it started (COUNTERS order, as a dict)."""
    return {name: fr_counter(i) for i, name in enumerate(COUNTERS)}


def crc_implementation():
    """Which CRC-32 the running engine uses: "isa-l", "zlib", or None when not running."""
    if not fr_running:
        return None
    return "isa-l" if fr_uses_isal() else "zlib"
