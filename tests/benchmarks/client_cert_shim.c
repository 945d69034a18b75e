/* LD_PRELOAD shim: gives wrk (or any dynamically linked OpenSSL client) a client certificate.
 *
 *   BENCH_CERT=client.pem BENCH_KEY=client.key LD_PRELOAD=./client_cert_shim.so wrk ...
 *
 * Every SSL_CTX the program creates gets the certificate chain and key loaded right after
 * SSL_CTX_new. BENCH_TLS_RESUME=0 drops the session an SSL object keeps across SSL_clear (wrk
 * reuses one SSL per connection slot), so every connection makes a full handshake; unset or 1
 * leaves the client's own behaviour (resume). At exit it prints how many handshakes were full and
 * how many resumed, so a run can prove which kind it measured.
 *
 * Build: cc -O2 -shared -fPIC -o client_cert_shim.so client_cert_shim.c -ldl -lssl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>

static unsigned long full_handshakes, resumed_handshakes;

SSL_CTX *SSL_CTX_new(const SSL_METHOD *method) {
    SSL_CTX *(*real)(const SSL_METHOD *) = (SSL_CTX * (*)(const SSL_METHOD *)) dlsym(RTLD_NEXT, "SSL_CTX_new");
    SSL_CTX *ctx = real(method);
    const char *cert = getenv("BENCH_CERT"), *key = getenv("BENCH_KEY");
    if (ctx != NULL && cert != NULL && key != NULL &&
        (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
         SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(ctx) != 1)) {
        fprintf(stderr, "client_cert_shim: cannot load %s / %s\n", cert, key);
        exit(2);
    }
    return ctx;
}

int SSL_connect(SSL *ssl) {
    static int (*real)(SSL *);
    static int no_resume = -1;
    if (real == NULL) real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
    if (no_resume < 0) no_resume = getenv("BENCH_TLS_RESUME") != NULL && getenv("BENCH_TLS_RESUME")[0] == '0';
    if (no_resume && SSL_in_before(ssl)) SSL_set_session(ssl, NULL);
    int r = real(ssl);
    if (r == 1) __atomic_add_fetch(SSL_session_reused(ssl) ? &resumed_handshakes : &full_handshakes, 1, __ATOMIC_RELAXED);
    return r;
}

__attribute__((destructor)) static void report(void) {
    fprintf(stderr, "client_cert_shim: handshakes full=%lu resumed=%lu\n", full_handshakes, resumed_handshakes);
}
