/* The session table's callbacks in C (tls_sessions.py says what the
 * table is). OpenSSL calls them on every full handshake; through ctypes they cost 13 us
 * quiet and about 30 us under load per new session, most of what two workers spend over one
 * on S2-new (issue #19).
 *
 * They do what tls_sessions._Bound.made, .dropped and .lookup do, byte for byte: the same
 * line-age cap (_cap_age), the same table encoding (for_the_table), the same keys and slot
 * digests (keyed BLAKE2b, as hashlib's), the same choice of slot (SessionStore.put) and the
 * same checks on a read (SessionStore.get).
 *
 * No libssl header is needed: the few functions used are called through the addresses
 * Python's ctypes resolved in the libssl Python's _ssl loaded (setup), with their OpenSSL 3
 * signatures declared here. The callbacks touch no Python object and need no GIL; a mutex
 * guards the bound contexts against bind/forget from Python.
 *
 * Built only with the compiled build (setup.py); the interpreted one uses the ctypes
 * callbacks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <limits.h>
#include <time.h>

/* ---- the table's layout, as tls_sessions.py ------------------------------------------- */
#define MAGIC "sidecar-sessions-v2"
#define FIRST 64
#define SLOT 4096
#define SLOT_HEAD 56 /* digest 16, key 16, expires 8, written 8, length 4, pad 4 */
#define MAX_SESSION (SLOT - SLOT_HEAD)
#define KEY 16
#define NAMESPACE 32
#define BEGAN 8
#define SEQUENCE 0x30
#define PEER 0xA3
#define APPDATA 0xB2
#define OCTETS 0x04
/* for_the_table adds at most this much: the new [18] and OCTET STRING lengths' bytes */
#define GROWTH 16

/* ---- libssl, by address ----------------------------------------------------------------- */
typedef void *(*get_ssl_ctx_f)(void *);
typedef const unsigned char *(*get_id_f)(void *, unsigned int *);
typedef int (*i2d_f)(void *, unsigned char **);
typedef long (*get_long_f)(void *);
typedef long (*set_timeout_f)(void *, long);
typedef int (*get0_appdata_f)(void *, void **, size_t *);
typedef int (*set1_appdata_f)(void *, const void *, size_t);
typedef void *(*d2i_f)(void **, const unsigned char **, long);

static struct {
    get_ssl_ctx_f get_ssl_ctx;
    get_id_f get_id;
    i2d_f i2d;
    get_long_f get_time;
    get_long_f get_timeout;
    set_timeout_f set_timeout;
    get0_appdata_f get0_appdata;
    set1_appdata_f set1_appdata;
    d2i_f d2i;
    int ready;
} ssl_fn;

/* ---- BLAKE2b (RFC 7693), keyed, as hashlib.blake2b(data, digest_size=n, key=k) --------- */
typedef struct {
    uint8_t b[128];
    uint64_t h[8];
    uint64_t t[2];
    size_t c;
    size_t outlen;
} b2b;

static const uint64_t b2b_iv[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL, 0xA54FF53A5F1D36F1ULL,
    0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL, 0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL};

static const uint8_t b2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

#define ROTR64(x, y) (((x) >> (y)) ^ ((x) << (64 - (y))))
#define B2B_G(a, b, c, d, x, y)            \
    do {                                   \
        v[a] = v[a] + v[b] + (x);          \
        v[d] = ROTR64(v[d] ^ v[a], 32);    \
        v[c] = v[c] + v[d];                \
        v[b] = ROTR64(v[b] ^ v[c], 24);    \
        v[a] = v[a] + v[b] + (y);          \
        v[d] = ROTR64(v[d] ^ v[a], 16);    \
        v[c] = v[c] + v[d];                \
        v[b] = ROTR64(v[b] ^ v[c], 63);    \
    } while (0)

static uint64_t le64(const uint8_t *p) {
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--) x = (x << 8) | p[i];
    return x;
}

static void b2b_compress(b2b *ctx, int last) {
    uint64_t v[16], m[16];
    for (int i = 0; i < 8; i++) {
        v[i] = ctx->h[i];
        v[i + 8] = b2b_iv[i];
    }
    v[12] ^= ctx->t[0];
    v[13] ^= ctx->t[1];
    if (last) v[14] = ~v[14];
    for (int i = 0; i < 16; i++) m[i] = le64(&ctx->b[8 * i]);
    for (int i = 0; i < 12; i++) {
        const uint8_t *s = b2b_sigma[i];
        B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) ctx->h[i] ^= v[i] ^ v[i + 8];
}

static void b2b_update(b2b *ctx, const uint8_t *in, size_t inlen) {
    while (inlen > 0) {
        if (ctx->c == 128) {
            ctx->t[0] += 128;
            if (ctx->t[0] < 128) ctx->t[1]++;
            b2b_compress(ctx, 0);
            ctx->c = 0;
        }
        size_t take = 128 - ctx->c;
        if (take > inlen) take = inlen;
        memcpy(ctx->b + ctx->c, in, take);
        ctx->c += take;
        in += take;
        inlen -= take;
    }
}

static void b2b_init(b2b *ctx, size_t outlen, const uint8_t *key, size_t keylen) {
    for (int i = 0; i < 8; i++) ctx->h[i] = b2b_iv[i];
    ctx->h[0] ^= 0x01010000ULL ^ ((uint64_t)keylen << 8) ^ (uint64_t)outlen;
    ctx->t[0] = ctx->t[1] = 0;
    ctx->c = 0;
    ctx->outlen = outlen;
    memset(ctx->b, 0, sizeof ctx->b);
    if (keylen > 0) {
        b2b_update(ctx, key, keylen);
        ctx->c = 128; /* the key's block, zero-padded, is a whole block */
    }
}

static void b2b_final(b2b *ctx, uint8_t *out) {
    ctx->t[0] += ctx->c;
    if (ctx->t[0] < ctx->c) ctx->t[1]++;
    while (ctx->c < 128) ctx->b[ctx->c++] = 0;
    b2b_compress(ctx, 1);
    for (size_t i = 0; i < ctx->outlen; i++) out[i] = (uint8_t)(ctx->h[i >> 3] >> (8 * (i & 7)));
}

/* ---- DER, as tls_sessions._element / _tlv / for_the_table -------------------------------- */

/* The element at `at`: 1 with its tag, content start and end, or 0 when it is not one. */
static int element(const uint8_t *der, size_t len, size_t at, int *tag, size_t *start,
                   size_t *end) {
    if (at + 2 > len) return 0;
    int t = der[at], first = der[at + 1];
    if ((t & 0x1F) == 0x1F) return 0;
    size_t s, length;
    if (first < 0x80) {
        s = at + 2;
        length = (size_t)first;
    } else {
        size_t count = (size_t)(first & 0x7F);
        s = at + 2 + count;
        if (count < 1 || count > 4 || s > len) return 0;
        length = 0;
        for (size_t i = at + 2; i < s; i++) length = (length << 8) | der[i];
        if (length < 0x80 || der[at + 2] == 0) return 0;
    }
    if (s > len || length > len - s) return 0;
    *tag = t;
    *start = s;
    *end = s + length;
    return 1;
}

/* A DER header for `tag` and `length`, written at `out`; its size. */
static size_t header(uint8_t *out, int tag, size_t length) {
    out[0] = (uint8_t)tag;
    if (length < 0x80) {
        out[1] = (uint8_t)length;
        return 2;
    }
    size_t size = 0;
    for (size_t l = length; l; l >>= 8) size++;
    out[1] = (uint8_t)(0x80 | size);
    for (size_t i = 0; i < size; i++) out[2 + i] = (uint8_t)(length >> (8 * (size - 1 - i)));
    return 2 + size;
}

static size_t header_size(size_t length) {
    size_t size = 2;
    if (length >= 0x80)
        for (size_t l = length; l; l >>= 8) size++;
    return size;
}

/* tls_sessions.for_the_table: `der` rewritten into `out` (at least len + GROWTH bytes); the
 * length written, `der`'s own length when it has no peer (out untouched: use der), or 0
 * when it is not a session as OpenSSL 3 encodes ours. */
static size_t for_the_table(const uint8_t *der, size_t len, uint8_t *out, int *same) {
    int tag;
    size_t start, end;
    *same = 0;
    size_t seq_start;
    if (!element(der, len, 0, &tag, &seq_start, &end) || tag != SEQUENCE || end != len) return 0;
    size_t peer_start = 0, peer_end = 0, app_at = 0, app_end = 0, began_at = 0, dropped = 0;
    int have_peer = 0, have_app = 0;
    for (size_t at = seq_start; at < len;) {
        size_t s, e;
        if (!element(der, len, at, &tag, &s, &e)) return 0;
        if (tag == PEER) { /* every one dropped; the last one's certificate kept */
            have_peer = 1;
            peer_start = s;
            peer_end = e;
            dropped += e - at;
        } else if (tag == APPDATA) {
            int inner;
            size_t is, ie;
            if (!element(der, len, s, &inner, &is, &ie) || inner != OCTETS || ie != e) return 0;
            if (e - is < BEGAN) return 0;
            have_app = 1;
            app_at = at;
            app_end = e;
            began_at = is;
        }
        at = e;
    }
    if (!have_app) return 0;
    if (!have_peer) {
        *same = 1;
        return len;
    }
    size_t peer_len = peer_end - peer_start;
    if (!element(der + peer_start, peer_len, 0, &tag, &start, &end) || tag != SEQUENCE ||
        end != peer_len)
        return 0;
    /* the fields but the peer, the (last) application data replaced */
    size_t octets = BEGAN + peer_len;
    size_t app_new = header_size(header_size(octets) + octets) + header_size(octets) + octets;
    size_t content = (len - seq_start) - dropped - (app_end - app_at) + app_new;
    if (header_size(content) + content > len + GROWTH) return 0;
    size_t w = header(out, SEQUENCE, content);
    for (size_t at = seq_start; at < len;) {
        size_t s, e;
        element(der, len, at, &tag, &s, &e);
        if (tag == PEER) {
            /* dropped */
        } else if (at == app_at) {
            w += header(out + w, APPDATA, header_size(octets) + octets);
            w += header(out + w, OCTETS, octets);
            memcpy(out + w, der + began_at, BEGAN);
            memcpy(out + w + BEGAN, der + peer_start, peer_len);
            w += octets;
        } else {
            memcpy(out + w, der + at, e - at);
            w += e - at;
        }
        at = e;
    }
    return w;
}

/* ---- the table, as tls_sessions.SessionStore ---------------------------------------------- */

static void store_le64(uint8_t *p, uint64_t x) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(x >> (8 * i));
}

static void slots_of(const uint8_t *key, size_t slots, size_t *one, size_t *other) {
    uint64_t first = le64(key) % slots;
    uint64_t second = (first ^ 1) < slots ? (first ^ 1) : first;
    *one = FIRST + (size_t)first * SLOT;
    *other = FIRST + (size_t)second * SLOT;
}

static void digest_of(const uint8_t *key, int64_t expires, size_t len, const uint8_t *der,
                      uint8_t *out) {
    uint8_t keyed[KEY + 8 + 4];
    memcpy(keyed, key, KEY);
    store_le64(keyed + KEY, (uint64_t)expires);
    for (int i = 0; i < 4; i++) keyed[KEY + 8 + i] = (uint8_t)((uint32_t)len >> (8 * i));
    b2b ctx;
    b2b_init(&ctx, 16, NULL, 0);
    b2b_update(&ctx, keyed, sizeof keyed);
    b2b_update(&ctx, der, len);
    b2b_final(&ctx, out);
}

/* SessionStore.put: 0 when the session is too large. */
static int put(uint8_t *table, size_t slots, const uint8_t *key, int64_t expires,
               const uint8_t *der, size_t len, double when) {
    if (len > MAX_SESSION) return 0;
    uint8_t head[SLOT_HEAD];
    size_t one, other;
    slots_of(key, slots, &one, &other);
    int64_t expires_one = (int64_t)le64(table + one + 32);
    int64_t written_one = (int64_t)le64(table + one + 40);
    int64_t expires_other = (int64_t)le64(table + other + 32);
    int64_t written_other = (int64_t)le64(table + other + 40);
    if ((double)expires_one <= when) written_one = -1;
    if ((double)expires_other <= when) written_other = -1;
    int key_one = memcmp(table + one + 16, key, KEY) == 0;
    int key_other = memcmp(table + other + 16, key, KEY) == 0;
    if (key_other || (!key_one && written_other < written_one)) one = other;
    digest_of(key, expires, len, der, head);
    memcpy(head + 16, key, KEY);
    store_le64(head + 32, (uint64_t)expires);
    store_le64(head + 40, (uint64_t)(int64_t)(when * 1e9));
    for (int i = 0; i < 4; i++) head[48 + i] = (uint8_t)((uint32_t)len >> (8 * i));
    memset(head + 52, 0, 4);
    memcpy(table + one, head, SLOT_HEAD);
    memcpy(table + one + SLOT_HEAD, der, len);
    return 1;
}

/* SessionStore.get: the DER kept under `key`, copied into `out` (MAX_SESSION bytes), and its
 * length; 0 when it expired, was replaced or is being written (its digest, checked on the
 * copy, does not match). */
static size_t get(const uint8_t *table, size_t slots, const uint8_t *key, double when,
                  uint8_t *out) {
    size_t at[2];
    slots_of(key, slots, &at[0], &at[1]);
    for (int i = 0; i < 2; i++) {
        const uint8_t *slot = table + at[i];
        uint8_t head[SLOT_HEAD], check[16];
        memcpy(head, slot, SLOT_HEAD);
        /* another worker may write the slot meanwhile: the checks below are on this copy,
         * never on the slot read again */
        __asm__ volatile("" ::: "memory");
        int64_t expires = (int64_t)le64(head + 32);
        uint32_t length = (uint32_t)head[48] | (uint32_t)head[49] << 8 |
                          (uint32_t)head[50] << 16 | (uint32_t)head[51] << 24;
        if (memcmp(head + 16, key, KEY) != 0 || length > MAX_SESSION || (double)expires <= when)
            continue;
        memcpy(out, slot + SLOT_HEAD, length);
        digest_of(key, expires, length, out, check);
        if (memcmp(check, head, 16) == 0) return length; /* 0: nothing to decode */
    }
    return 0;
}

static void remove_key(uint8_t *table, size_t slots, const uint8_t *key) {
    size_t one, other;
    slots_of(key, slots, &one, &other);
    if (memcmp(table + one + 16, key, KEY) == 0) memset(table + one + 16, 0, KEY);
    if (memcmp(table + other + 16, key, KEY) == 0) memset(table + other + 16, 0, KEY);
}

static void key_of(const uint8_t *ns, const uint8_t *name, size_t len, uint8_t *out) {
    b2b ctx;
    b2b_init(&ctx, KEY, ns, NAMESPACE);
    b2b_update(&ctx, name, len);
    b2b_final(&ctx, out);
}

/* ---- bound contexts ------------------------------------------------------------------------ */
typedef struct {
    void *ctx;
    uint8_t ns[NAMESPACE];
    Py_buffer table; /* table.buf NULL: no table (the line-age cap only) */
    size_t slots;
    int peerless;
    long max_age;        /* tls_sessions.MAX_AGE when the context was bound */
    uint64_t generation; /* changes at every bind and detach */
} bound_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static bound_t *bound;
static size_t nbound, capbound;
static uint64_t generations;

static bound_t *find(void *ctx) {
    for (size_t i = 0; i < nbound; i++)
        if (bound[i].ctx == ctx) return &bound[i];
    return NULL;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* tls_sessions._cap_age */
static void cap_age(void *session, long max_age) {
    long made = ssl_fn.get_time(session);
    void *data = NULL;
    size_t length = 0;
    long began;
    if (ssl_fn.get0_appdata(session, &data, &length) == 1 && data && length >= BEGAN) {
        const uint8_t *p = data;
        uint64_t b = 0;
        for (int i = 0; i < BEGAN; i++) b = (b << 8) | p[i];
        if (max_age < 0 || b > (uint64_t)(LONG_MAX - max_age))
            return; /* Python: a line beginning that late has all its time left */
        began = (long)b;
    } else {
        uint8_t stamp[BEGAN];
        began = made;
        for (int i = 0; i < BEGAN; i++) stamp[i] = (uint8_t)((uint64_t)began >> (8 * (7 - i)));
        if (ssl_fn.set1_appdata(session, stamp, BEGAN) != 1) {
            ssl_fn.set_timeout(session, 0);
            return;
        }
    }
    long left = began + max_age - made;
    if (left < 0) left = 0;
    if (left < ssl_fn.get_timeout(session)) ssl_fn.set_timeout(session, left);
}

/* A session's name (1 to 64 bytes, as tls_sessions._Bound._name) into `name`; its length,
 * or 0. */
static unsigned int name_of(void *session, uint8_t *name) {
    unsigned int length = 0;
    const unsigned char *at = ssl_fn.get_id(session, &length);
    if (!at || length < 1 || length > 64) return 0;
    memcpy(name, at, length);
    return length;
}

/* What a callback needs of a bound context, copied under the lock: no libssl function is
 * called while the lock is held (OpenSSL calls the remove callback with the context's own
 * lock held, and SSL_SESSION_set_timeout takes that lock: holding ours around it would
 * order the two locks both ways). */
typedef struct {
    int found;
    uint8_t ns[NAMESPACE];
    int table; /* the context has a table */
    uint64_t generation;
    int peerless;
    long max_age;
} seen_t;

static seen_t look(void *ctx) {
    seen_t seen;
    memset(&seen, 0, sizeof seen);
    bound_t *b = find(ctx);
    if (b) {
        seen.found = 1;
        memcpy(seen.ns, b->ns, NAMESPACE);
        seen.table = b->table.buf != NULL;
        seen.generation = b->generation;
        seen.peerless = b->peerless;
        seen.max_age = b->max_age;
    }
    return seen;
}

/* The context's table, if it is still the one `seen` saw (under the lock). */
static bound_t *still(void *ctx, const seen_t *seen) {
    bound_t *b = find(ctx);
    return b && b->table.buf && b->generation == seen->generation ? b : NULL;
}

/* SSL_CTX_sess_set_new_cb: tls_sessions._Bound.made. OpenSSL keeps its reference (0). */
static int on_new(void *ssl, void *session) {
    if (!ssl || !session || !ssl_fn.ready) return 0;
    void *ctx = ssl_fn.get_ssl_ctx(ssl);
    pthread_mutex_lock(&lock);
    seen_t seen = look(ctx);
    pthread_mutex_unlock(&lock);
    if (!seen.found) return 0;
    cap_age(session, seen.max_age);
    uint8_t name[64], key[KEY];
    unsigned int name_len = seen.table ? name_of(session, name) : 0;
    if (!name_len) return 0;
    key_of(seen.ns, name, name_len, key);
    int size = ssl_fn.i2d(session, NULL);
    if (size <= 0 || size > MAX_SESSION) return 0;
    uint8_t der[MAX_SESSION + GROWTH], out[MAX_SESSION + GROWTH];
    unsigned char *cursor = der;
    if (ssl_fn.i2d(session, &cursor) != size) return 0;
    const uint8_t *kept = der;
    size_t kept_len = (size_t)size;
    if (seen.peerless) {
        int same;
        kept_len = for_the_table(der, (size_t)size, out, &same);
        kept = same ? der : out;
    }
    if (!kept_len) return 0; /* not as OpenSSL 3 encodes a session: its worker's only */
    int64_t expires = (int64_t)ssl_fn.get_time(session) + ssl_fn.get_timeout(session);
    double when = now();
    pthread_mutex_lock(&lock);
    bound_t *b = still(ctx, &seen);
    if (b) put(b->table.buf, b->slots, key, expires, kept, kept_len, when);
    pthread_mutex_unlock(&lock);
    return 0;
}

/* SSL_CTX_sess_set_remove_cb: tls_sessions._Bound.dropped */
static void on_remove(void *ctx, void *session) {
    if (!ctx || !session || !ssl_fn.ready) return;
    uint8_t name[64], key[KEY];
    unsigned int name_len = name_of(session, name);
    if (!name_len) return;
    pthread_mutex_lock(&lock);
    seen_t seen = look(ctx);
    if (seen.found && seen.table) {
        key_of(seen.ns, name, name_len, key);
        bound_t *b = still(ctx, &seen);
        if (b) remove_key(b->table.buf, b->slots, key);
    }
    pthread_mutex_unlock(&lock);
}

/* SSL_CTX_sess_set_get_cb: tls_sessions._Bound.lookup. A session made by another worker,
 * decoded; OpenSSL takes the reference d2i made (*copy = 0). */
static void *on_get(void *ssl, const unsigned char *name, int length, int *copy) {
    if (!ssl || !name || length < 1 || length > 64 || !copy || !ssl_fn.ready) return NULL;
    void *ctx = ssl_fn.get_ssl_ctx(ssl);
    uint8_t key[KEY], der[MAX_SESSION];
    size_t len = 0;
    pthread_mutex_lock(&lock);
    seen_t seen = look(ctx);
    if (seen.found && seen.table) {
        key_of(seen.ns, name, (size_t)length, key);
        bound_t *b = still(ctx, &seen);
        if (b) len = get(b->table.buf, b->slots, key, now(), der);
    }
    pthread_mutex_unlock(&lock);
    if (!len) return NULL;
    const unsigned char *cursor = der;
    void *session = ssl_fn.d2i(NULL, &cursor, (long)len);
    if (session) *copy = 0;
    return session;
}

/* ---- Python ---------------------------------------------------------------------------------- */

static int table_of(PyObject *table, Py_buffer *view, size_t *slots) {
    if (PyObject_GetBuffer(table, view, PyBUF_WRITABLE) != 0) return -1;
    size_t len = (size_t)view->len;
    if (len < FIRST + SLOT || (len - FIRST) % SLOT != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "not a session table's size");
        return -1;
    }
    *slots = (len - FIRST) / SLOT;
    return 0;
}

static void release(bound_t *b) {
    if (b->table.buf) PyBuffer_Release(&b->table);
    memset(&b->table, 0, sizeof b->table);
}

static PyObject *py_setup(PyObject *self, PyObject *args) {
    unsigned long long a[9];
    if (!PyArg_ParseTuple(args, "(KKKKKKKKK)", &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6],
                          &a[7], &a[8]))
        return NULL;
    for (int i = 0; i < 9; i++)
        if (!a[i]) {
            PyErr_SetString(PyExc_ValueError, "a libssl function's address is missing");
            return NULL;
        }
    pthread_mutex_lock(&lock);
    ssl_fn.get_ssl_ctx = (get_ssl_ctx_f)(uintptr_t)a[0];
    ssl_fn.get_id = (get_id_f)(uintptr_t)a[1];
    ssl_fn.i2d = (i2d_f)(uintptr_t)a[2];
    ssl_fn.get_time = (get_long_f)(uintptr_t)a[3];
    ssl_fn.get_timeout = (get_long_f)(uintptr_t)a[4];
    ssl_fn.set_timeout = (set_timeout_f)(uintptr_t)a[5];
    ssl_fn.get0_appdata = (get0_appdata_f)(uintptr_t)a[6];
    ssl_fn.set1_appdata = (set1_appdata_f)(uintptr_t)a[7];
    ssl_fn.d2i = (d2i_f)(uintptr_t)a[8];
    ssl_fn.ready = 1;
    pthread_mutex_unlock(&lock);
    Py_RETURN_NONE;
}

static PyObject *py_callbacks(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(KKK)", (unsigned long long)(uintptr_t)&on_new,
                         (unsigned long long)(uintptr_t)&on_remove,
                         (unsigned long long)(uintptr_t)&on_get);
}

static PyObject *py_bind(PyObject *self, PyObject *args) {
    unsigned long long ctx;
    Py_buffer ns;
    PyObject *table;
    int peerless;
    long max_age;
    if (!PyArg_ParseTuple(args, "Ky*Opl", &ctx, &ns, &table, &peerless, &max_age)) return NULL;
    if (ns.len != NAMESPACE || !ctx) {
        PyBuffer_Release(&ns);
        PyErr_SetString(PyExc_ValueError, "a context's address and a 32-byte namespace");
        return NULL;
    }
    bound_t entry;
    memset(&entry, 0, sizeof entry);
    entry.ctx = (void *)(uintptr_t)ctx;
    memcpy(entry.ns, ns.buf, NAMESPACE);
    PyBuffer_Release(&ns);
    entry.peerless = peerless;
    entry.max_age = max_age;
    if (table != Py_None && table_of(table, &entry.table, &entry.slots) != 0) return NULL;
    pthread_mutex_lock(&lock);
    bound_t *b = find(entry.ctx);
    if (!b && nbound == capbound) {
        size_t cap = capbound ? capbound * 2 : 16;
        bound_t *grown = PyMem_RawRealloc(bound, cap * sizeof *bound);
        if (!grown) {
            pthread_mutex_unlock(&lock);
            release(&entry);
            return PyErr_NoMemory();
        }
        bound = grown;
        capbound = cap;
    }
    bound_t old;
    memset(&old, 0, sizeof old);
    if (b) {
        old = *b;
    } else {
        b = &bound[nbound++];
    }
    entry.generation = ++generations;
    *b = entry;
    pthread_mutex_unlock(&lock);
    release(&old);
    Py_RETURN_NONE;
}

static PyObject *py_forget(PyObject *self, PyObject *args) {
    unsigned long long ctx;
    if (!PyArg_ParseTuple(args, "K", &ctx)) return NULL;
    bound_t old;
    memset(&old, 0, sizeof old);
    pthread_mutex_lock(&lock);
    bound_t *b = find((void *)(uintptr_t)ctx);
    if (b) {
        old = *b;
        *b = bound[--nbound];
    }
    pthread_mutex_unlock(&lock);
    release(&old);
    return PyBool_FromLong(b != NULL);
}

/* Every bound context lets go of `table` (before it is closed): they keep the line-age cap. */
static PyObject *py_detach(PyObject *self, PyObject *table) {
    size_t n = 0;
    pthread_mutex_lock(&lock);
    Py_buffer *views = nbound ? PyMem_RawCalloc(nbound, sizeof *views) : NULL;
    if (nbound && !views) {
        pthread_mutex_unlock(&lock);
        return PyErr_NoMemory(); /* nothing let go: the table stays mapped and written */
    }
    for (size_t i = 0; i < nbound; i++)
        if (bound[i].table.buf && bound[i].table.obj == table) {
            views[n++] = bound[i].table;
            memset(&bound[i].table, 0, sizeof bound[i].table);
            bound[i].generation = ++generations;
        }
    pthread_mutex_unlock(&lock);
    for (size_t i = 0; i < n; i++) PyBuffer_Release(&views[i]);
    PyMem_RawFree(views);
    return PyLong_FromSize_t(n);
}

/* ---- for the tests: the pieces, against tls_sessions' Python ---------------------------- */

static PyObject *py_for_the_table(PyObject *self, PyObject *arg) {
    Py_buffer der;
    if (PyObject_GetBuffer(arg, &der, PyBUF_SIMPLE) != 0) return NULL;
    size_t len = (size_t)der.len;
    uint8_t *out = PyMem_Malloc(len + GROWTH + 1);
    if (!out) {
        PyBuffer_Release(&der);
        return PyErr_NoMemory();
    }
    int same;
    size_t written = for_the_table(der.buf, len, out, &same);
    PyObject *result;
    if (!written) {
        result = Py_NewRef(Py_None);
    } else {
        result = PyBytes_FromStringAndSize(same ? der.buf : (const char *)out, (Py_ssize_t)written);
    }
    PyMem_Free(out);
    PyBuffer_Release(&der);
    return result;
}

static PyObject *py_key(PyObject *self, PyObject *args) {
    Py_buffer ns, name;
    if (!PyArg_ParseTuple(args, "y*y*", &ns, &name)) return NULL;
    PyObject *result = NULL;
    if (ns.len != NAMESPACE) {
        PyErr_SetString(PyExc_ValueError, "a 32-byte namespace");
    } else {
        uint8_t key[KEY];
        key_of(ns.buf, name.buf, (size_t)name.len, key);
        result = PyBytes_FromStringAndSize((const char *)key, KEY);
    }
    PyBuffer_Release(&ns);
    PyBuffer_Release(&name);
    return result;
}

/* The test helpers' table and key: 0, or -1 with an exception set (key released then). */
static int table_and_key(PyObject *table, Py_buffer *key, Py_buffer *view, size_t *slots) {
    if (key->len != KEY) {
        PyErr_SetString(PyExc_ValueError, "a 16-byte key");
    } else if (table_of(table, view, slots) == 0) {
        return 0;
    }
    PyBuffer_Release(key);
    return -1;
}

static PyObject *py_put(PyObject *self, PyObject *args) {
    PyObject *table;
    Py_buffer key, der, view;
    long long expires;
    double when;
    size_t slots;
    if (!PyArg_ParseTuple(args, "Oy*Ly*d", &table, &key, &expires, &der, &when)) return NULL;
    if (table_and_key(table, &key, &view, &slots) != 0) {
        PyBuffer_Release(&der);
        return NULL;
    }
    int kept = put(view.buf, slots, key.buf, expires, der.buf, (size_t)der.len, when);
    PyBuffer_Release(&view);
    PyBuffer_Release(&key);
    PyBuffer_Release(&der);
    return PyBool_FromLong(kept);
}

static PyObject *py_get(PyObject *self, PyObject *args) {
    PyObject *table;
    Py_buffer key, view;
    double when;
    size_t slots;
    if (!PyArg_ParseTuple(args, "Oy*d", &table, &key, &when)) return NULL;
    if (table_and_key(table, &key, &view, &slots) != 0) return NULL;
    uint8_t der[MAX_SESSION];
    size_t len = get(view.buf, slots, key.buf, when, der);
    PyBuffer_Release(&view);
    PyBuffer_Release(&key);
    return len ? PyBytes_FromStringAndSize((const char *)der, (Py_ssize_t)len) : Py_NewRef(Py_None);
}

static PyMethodDef methods[] = {
    {"setup", py_setup, METH_VARARGS,
     "setup(addresses): libssl's functions (SSL_get_SSL_CTX, SSL_SESSION_get_id, "
     "i2d_SSL_SESSION, SSL_SESSION_get_time, _get_timeout, _set_timeout, "
     "_get0_ticket_appdata, _set1_ticket_appdata, d2i_SSL_SESSION)"},
    {"callbacks", py_callbacks, METH_NOARGS,
     "the new-, remove- and get-session callbacks' addresses"},
    {"bind", py_bind, METH_VARARGS,
     "bind(ctx, namespace, table or None, peerless, max_age): what a context does with its "
     "sessions"},
    {"forget", py_forget, METH_VARARGS, "forget(ctx): the context's sessions are not watched"},
    {"detach", py_detach, METH_O, "detach(table): no context writes to table any more"},
    {"for_the_table", py_for_the_table, METH_O, "tls_sessions.for_the_table, in C"},
    {"key", py_key, METH_VARARGS, "key(namespace, name): a session name's key in the table"},
    {"put", py_put, METH_VARARGS, "put(table, key, expires, der, now): SessionStore.put"},
    {"get", py_get, METH_VARARGS, "get(table, key, now): SessionStore.get"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sessions_c", "The session table's callbacks in C (tls_sessions).",
    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__sessions_c(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    /* what this file assumes of tls_sessions.py's table: _native() uses C only where they
     * agree (first slot, slot, slot head, line start, magic) */
    PyObject *layout = Py_BuildValue("(iiiiy)", FIRST, SLOT, SLOT_HEAD, BEGAN, MAGIC);
    if (!layout || PyModule_AddObject(m, "LAYOUT", layout) != 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
