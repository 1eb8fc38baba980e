/*
 * The test guest that patched QEMU boots under KVM (tests/tests/qemu_kvm.rs).
 *
 * Each vCPU asks for its certificate table the way a Linux SNP guest does:
 * through the coco-sidecar object's kernel stand-in (x-emulate-exit), an
 * OUT to port 0xcc0 with EAX = buffer gpa and EBX = npages, where the GHCB
 * carries them. It probes with the page count the test chose (0: the size
 * probe), follows ENOSPC to the page count it learns, backs off and retries
 * on EAGAIN, and checks the table it got itself: the terminator, known
 * GUIDs, offsets and lengths inside the buffer, each entry one DER SEQUENCE
 * of exactly its length, the bytes after the table untouched, and the
 * FNV-1a digest of the whole table against the ones the test allows.
 * It reports on COM1, one line per request:
 *
 *   REQ cpu=0 n=1 pages=2 enospc=1 eagain=0 entries=3 digest=0123abcd
 *   BUSY cpu=0 n=4          (first EAGAIN of a request)
 *   FAIL cpu=0 n=4 what=... value=...
 *   END cpu=0               (this vCPU made all its requests)
 *   DONE                    (every vCPU did; from the bootstrap vCPU)
 *
 * Freestanding, 32-bit, no writable data: the image is ROM. What changes
 * lives in RAM below 1 MiB (SHARED, the stacks set up in entry.S).
 */
#include <stdint.h>

#define STANDIN_PORT    0xcc0
#define COM1            0x3f8
#define PAGE            4096
#define MAX_PAGES       4       /* Linux's 16 KiB certificate buffer */
#define CANARY          0xa5
#define MAX_CPUS        2

/* VMM error codes in the upper half of SW_EXITINFO2 */
#define VMM_OK          0
#define VMM_INVALID_LEN 1
#define VMM_BUSY        2
#define VMM_GENERIC     0x80000000u

#define PARAMS_MAGIC    0x31504343u     /* "CCP1" */

/* Written by the test into the image at offset 0x100 (guest.ld) */
struct params {
    uint32_t magic;
    uint32_t ncpus;             /* vCPUs that make requests */
    uint32_t buf_gpa[MAX_CPUS]; /* each vCPU's buffer, MAX_PAGES long */
    uint32_t first_npages;      /* pages offered first; 0 probes */
    uint32_t requests;          /* successful requests per vCPU */
    uint32_t budget_s;          /* seconds of EAGAIN in a row, then FAIL */
    uint32_t retry_spins;       /* port 0x80 writes between retries */
    uint32_t pace_spins;        /* and between successful requests */
    uint32_t digests[2];        /* allowed table digests; 0: any */
};

__attribute__((section(".params"), used))
static const volatile struct params params = { .magic = 0 };

/* RAM shared by the vCPUs */
struct shared {
    volatile uint32_t print_lock;
    volatile uint32_t ended;
};
#define SHARED ((struct shared *)0x6f000)

static const uint8_t known_guids[][16] = {
    /* VCEK 63da758d-e664-4564-adc5-f4b93be8accd */
    { 0x63, 0xda, 0x75, 0x8d, 0xe6, 0x64, 0x45, 0x64,
      0xad, 0xc5, 0xf4, 0xb9, 0x3b, 0xe8, 0xac, 0xcd },
    /* VLEK a8074bc2-a25a-483e-aae6-39c045a0b8a1 */
    { 0xa8, 0x07, 0x4b, 0xc2, 0xa2, 0x5a, 0x48, 0x3e,
      0xaa, 0xe6, 0x39, 0xc0, 0x45, 0xa0, 0xb8, 0xa1 },
    /* ASK 4ab7b379-bbac-4fe4-a02f-05aef327c782 */
    { 0x4a, 0xb7, 0xb3, 0x79, 0xbb, 0xac, 0x4f, 0xe4,
      0xa0, 0x2f, 0x05, 0xae, 0xf3, 0x27, 0xc7, 0x82 },
    /* ARK c0b406a4-a803-4952-9743-3fb6014cd0ae */
    { 0xc0, 0xb4, 0x06, 0xa4, 0xa8, 0x03, 0x49, 0x52,
      0x97, 0x43, 0x3f, 0xb6, 0x01, 0x4c, 0xd0, 0xae },
    /* CRL 92f81bc3-5811-4d3d-97ff-d19f88dc67ea */
    { 0x92, 0xf8, 0x1b, 0xc3, 0x58, 0x11, 0x4d, 0x3d,
      0x97, 0xff, 0xd1, 0x9f, 0x88, 0xdc, 0x67, 0xea },
};

void guest_main(uint32_t cpu);

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;

    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void mmio_write(uint32_t addr, uint32_t v)
{
    *(volatile uint32_t *)addr = v;
}

static void spin(uint32_t n)
{
    while (n--) {
        outb(0x80, 0);          /* each one exits to QEMU: a few us */
    }
}

static uint8_t rtc_seconds(void)
{
    outb(0x70, 0x00);
    return inb(0x71);
}

static uint32_t le32(const uint8_t *p)
{
    return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- output, a line at a time under a lock ---- */

struct line {
    char buf[160];
    uint32_t len;
};

static void put(struct line *l, const char *s)
{
    while (*s && l->len < sizeof(l->buf) - 1) {
        l->buf[l->len++] = *s++;
    }
}

static void put_dec(struct line *l, uint32_t v)
{
    char tmp[10];
    int n = 0;

    do {
        tmp[n++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (n && l->len < sizeof(l->buf) - 1) {
        l->buf[l->len++] = tmp[--n];
    }
}

static void put_hex(struct line *l, uint32_t v)
{
    for (int shift = 28; shift >= 0 && l->len < sizeof(l->buf) - 1;
         shift -= 4) {
        l->buf[l->len++] = "0123456789abcdef"[(v >> shift) & 0xf];
    }
}

static void emit(struct line *l)
{
    while (__atomic_exchange_n(&SHARED->print_lock, 1, __ATOMIC_ACQUIRE)) {
        __asm__ volatile("pause");
    }
    for (uint32_t i = 0; i < l->len; i++) {
        while (!(inb(COM1 + 5) & 0x20)) {
            /* transmitter busy */
        }
        outb(COM1, l->buf[i]);
    }
    outb(COM1, '\n');
    __atomic_store_n(&SHARED->print_lock, 0, __ATOMIC_RELEASE);
}

static void say(const char *what, uint32_t cpu, uint32_t n)
{
    struct line l = { .len = 0 };

    put(&l, what);
    put(&l, " cpu=");
    put_dec(&l, cpu);
    if (n) {
        put(&l, " n=");
        put_dec(&l, n);
    }
    emit(&l);
}

static void __attribute__((noreturn)) halt(void)
{
    for (;;) {
        __asm__ volatile("cli; hlt");
    }
}

static void __attribute__((noreturn))
fail(uint32_t cpu, uint32_t n, const char *what, uint32_t value)
{
    struct line l = { .len = 0 };

    put(&l, "FAIL cpu=");
    put_dec(&l, cpu);
    put(&l, " n=");
    put_dec(&l, n);
    put(&l, " what=");
    put(&l, what);
    put(&l, " value=");
    put_hex(&l, value);
    emit(&l);
    halt();
}

/* ---- the certificate request and the table ---- */

/* One SNP Extended Guest Request; returns the VMM error code */
static uint32_t request(uint32_t gpa, uint32_t *npages)
{
    uint32_t b = *npages, d = STANDIN_PORT;

    __asm__ volatile("outl %%eax, %%dx"
                     : "+b"(b), "+d"(d) : "a"(gpa) : "memory");
    *npages = b;
    return d;
}

/* Length of the DER element at @p (tag, length, contents), or 0 */
static uint32_t der_length(const uint8_t *p, uint32_t avail)
{
    uint32_t len = 0, n;

    if (avail < 2 || p[0] != 0x30) {
        return 0;                       /* not a SEQUENCE */
    }
    if (p[1] < 0x80) {
        return 2 + p[1];
    }
    n = p[1] & 0x7f;
    if (n == 0 || n > 3 || avail < 2 + n) {
        return 0;
    }
    for (uint32_t i = 0; i < n; i++) {
        len = len << 8 | p[2 + i];
    }
    return 2 + n + len;
}

static int known_guid(const uint8_t *g)
{
    for (unsigned k = 0; k < sizeof(known_guids) / 16; k++) {
        int same = 1;

        for (int i = 0; i < 16; i++) {
            same &= g[i] == known_guids[k][i];
        }
        if (same) {
            return 1;
        }
    }
    return 0;
}

static int all_zero(const uint8_t *p, uint32_t n)
{
    uint8_t acc = 0;

    while (n--) {
        acc |= *p++;
    }
    return !acc;
}

/*
 * Check the table in a buffer of @pages pages; on success return its
 * number of entries, its length in *@end and its digest in *@digest.
 */
static uint32_t check_table(uint32_t cpu, uint32_t n, const uint8_t *t,
                            uint32_t pages, uint32_t *end, uint32_t *digest)
{
    uint32_t size = pages * PAGE, entries = 0, last = 0, h;

    for (;; entries++) {
        const uint8_t *e = t + 24 * entries;
        uint32_t off, len;

        if (24 * (entries + 1) > size) {
            fail(cpu, n, "no-terminator", entries);
        }
        if (all_zero(e, 24)) {
            break;
        }
        if (!known_guid(e)) {
            fail(cpu, n, "unknown-guid", le32(e));
        }
        off = le32(e + 16);
        len = le32(e + 20);
        if (!len || off > size || len > size - off) {
            fail(cpu, n, "entry-outside-buffer", entries);
        }
        if (der_length(t + off, len) != len) {
            fail(cpu, n, "not-one-der-sequence", entries);
        }
        if (off + len > last) {
            last = off + len;
        }
    }
    for (uint32_t i = 0; i < entries; i++) {
        if (le32(t + 24 * i + 16) < 24 * (entries + 1)) {
            fail(cpu, n, "data-overlaps-entries", i);
        }
    }
    if (!entries) {
        last = 24;              /* the empty table: the terminator alone */
    }
    for (uint32_t i = last; i < size; i++) {
        if (t[i] != CANARY) {
            fail(cpu, n, "written-past-the-table", i);
        }
    }
    h = 0x811c9dc5;             /* FNV-1a, 32 bits */
    for (uint32_t i = 0; i < last; i++) {
        h = (h ^ t[i]) * 0x01000193;
    }
    *end = last;
    *digest = h;
    return entries;
}

static void start_other_cpus(void)
{
    /* Local APIC: software-enable, then INIT and SIPI to all but self */
    mmio_write(0xfee000f0, 0x1ff);
    mmio_write(0xfee00310, 0);
    mmio_write(0xfee00300, 0x000c4500);
    spin(2000);
    mmio_write(0xfee00300, 0x000c46f0);     /* start at 0xf0000 */
    spin(100);
    mmio_write(0xfee00300, 0x000c46f0);
}

void guest_main(uint32_t cpu)
{
    uint32_t count = params.ncpus;

    if (params.magic != PARAMS_MAGIC) {
        fail(cpu, 0, "no-parameters", params.magic);
    }
    if (cpu == 0 && count > 1) {
        start_other_cpus();
    }
    if (cpu >= count || cpu >= MAX_CPUS) {
        halt();
    }

    for (uint32_t n = 1; n <= params.requests; n++) {
        uint8_t *buf = (uint8_t *)params.buf_gpa[cpu];
        uint32_t npages = params.first_npages, enospc = 0, eagain = 0;
        uint32_t waited = 0, end, digest, entries;
        uint8_t second = rtc_seconds();

        for (uint32_t i = 0; i < MAX_PAGES * PAGE; i++) {
            buf[i] = CANARY;
        }
        for (;;) {
            uint32_t err = request((uint32_t)buf, &npages);

            if (err == VMM_OK) {
                break;
            }
            if (err == VMM_INVALID_LEN) {
                /* ENOSPC: npages is what the table needs */
                if (!npages || npages > MAX_PAGES || ++enospc > 2) {
                    fail(cpu, n, "enospc-pages", npages);
                }
                continue;
            }
            if (err != VMM_BUSY) {
                fail(cpu, n, err == VMM_GENERIC ? "eio" : "vmm-error", err);
            }
            /* EAGAIN: back off and retry, as Linux does, for a while */
            if (!eagain++) {
                say("BUSY", cpu, n);
            }
            spin(params.retry_spins);
            if (rtc_seconds() != second) {
                second = rtc_seconds();
                if (++waited > params.budget_s) {
                    fail(cpu, n, "eagain-budget", eagain);
                }
            }
        }

        entries = check_table(cpu, n, buf, npages, &end, &digest);
        if ((params.digests[0] || params.digests[1]) &&
            digest != params.digests[0] && digest != params.digests[1]) {
            fail(cpu, n, "digest", digest);
        }
        {
            struct line l = { .len = 0 };

            put(&l, "REQ cpu=");
            put_dec(&l, cpu);
            put(&l, " n=");
            put_dec(&l, n);
            put(&l, " pages=");
            put_dec(&l, npages);
            put(&l, " enospc=");
            put_dec(&l, enospc);
            put(&l, " eagain=");
            put_dec(&l, eagain);
            put(&l, " entries=");
            put_dec(&l, entries);
            put(&l, " bytes=");
            put_dec(&l, end);
            put(&l, " digest=");
            put_hex(&l, digest);
            emit(&l);
        }
        spin(params.pace_spins);
    }

    say("END", cpu, 0);
    __atomic_add_fetch(&SHARED->ended, 1, __ATOMIC_SEQ_CST);
    if (cpu == 0) {
        while (__atomic_load_n(&SHARED->ended, __ATOMIC_SEQ_CST) < count) {
            __asm__ volatile("pause");
        }
        {
            struct line l = { .len = 0 };

            put(&l, "DONE");
            emit(&l);
        }
    }
    halt();
}

/* The compiler may call these for struct initialisers and loops */
void *memset(void *s, int c, unsigned int n);
void *memset(void *s, int c, unsigned int n)
{
    uint8_t *p = s;

    while (n--) {
        *p++ = c;
    }
    return s;
}
