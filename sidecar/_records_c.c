/* A connection's TLS records decrypted in one call (tls_records.py says when and why).
 *
 * tls_transport reads what the incoming memory BIO holds with ssl.SSLObject.read, one record
 * (16 KiB at most) per call: a Python call, a new bytes object and, when the read held several
 * records, a join that copies all of them once more. A 1 MiB upload arrives as about 64
 * records; with two workers the joins and calls were about 7 % of a worker's time (issue #19,
 * S3 upload). Here SSL_read_ex decrypts every record into one bytes object, sized beforehand
 * to hold them all, which is then shrunk to what was read.
 *
 * No libssl header is needed: SSL_read_ex, SSL_get_error and ERR_clear_error are called
 * through the addresses Python's ctypes resolved in the libssl Python's _ssl loaded (setup),
 * with their OpenSSL 3 signatures declared here. The SSL is read where CPython's _ssl keeps it
 * in its _SSLSocket (the object's header, the socket's weak reference (NULL over memory
 * BIOs), the SSL, then the context), only in an object of exactly the type setup was given,
 * over memory BIOs, and whose context field holds the context the caller read from the same
 * object's attribute (which checks the layout, nothing more). The GIL is held throughout, as
 * nothing here waits: the BIOs are memory.
 *
 * A read that fails (a record that does not decrypt, an alert) reads nothing more and leaves
 * OpenSSL's error queue as it is: the caller reads once more with ssl.SSLObject.read, which
 * raises the SSLError Python makes of that error (the reason, the alert OpenSSL sends).
 *
 * read(..., data) decrypts the bytes of a socket read without writing them into the memory
 * BIO first (issue #19: MemoryBIO.write zero-fills the BIO's room, then copies, 6 % of a
 * worker's time during uploads). The incoming BIO must be empty: the SSL's read BIO is swapped
 * for a read-only memory BIO over data's buffer (OpenSSL's BIO_new_mem_buf: no copy), the
 * records are read as above, whatever OpenSSL did not take of data (what follows a close_notify
 * or a record that failed, or the rest of a read the limit cut short; a record begun is kept in
 * OpenSSL's own buffer) is written into the incoming BIO, and the SSL's read BIO is set back,
 * all before it returns. The GIL is held throughout, so nothing else sees the swap; the
 * caller's reference keeps data alive.
 *
 * Built only with the compiled build (setup.py); the interpreted one joins in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>

typedef int (*read_ex_f)(void *, void *, size_t, size_t *);
typedef int (*get_error_f)(const void *, int);
typedef void (*clear_error_f)(void);
typedef void *(*get_rbio_f)(const void *);
typedef void (*set0_rbio_f)(void *, void *);
typedef void *(*new_mem_buf_f)(const void *, int);
typedef long (*bio_ctrl_f)(void *, int, long, void *);
typedef int (*bio_up_ref_f)(void *);
typedef int (*bio_write_f)(void *, const void *, int);
typedef int (*bio_free_f)(void *);
typedef long (*ssl_ctrl_f)(void *, int, long, void *);
typedef int (*free_buffers_f)(void *);

static struct {
    read_ex_f read_ex;
    get_error_f get_error;
    clear_error_f clear_error;
    get_rbio_f get_rbio;
    set0_rbio_f set0_rbio;
    new_mem_buf_f new_mem_buf;
    bio_ctrl_f bio_ctrl;
    bio_up_ref_f bio_up_ref;
    bio_write_f bio_write;
    bio_free_f bio_free;
    ssl_ctrl_f ssl_ctrl;
    free_buffers_f free_buffers;
    PyTypeObject *socket_type; /* _ssl._SSLSocket */
    int release_once;          /* SSL_free_buffers keeps a record begun (setup) */
} fn;

#define ADDRESSES 12

/* OpenSSL's SSL_get_error codes */
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_ZERO_RETURN 6
/* OpenSSL's BIO_ctrl commands */
#define BIO_CTRL_INFO 3
#define BIO_CTRL_PENDING 10
#define BIO_C_SET_BUF_MEM_EOF_RETURN 130
/* OpenSSL's SSL_ctrl commands (SSL_get_mode, SSL_set_mode, SSL_clear_mode) and the mode */
#define SSL_CTRL_MODE 33
#define SSL_CTRL_CLEAR_MODE 78
#define SSL_MODE_RELEASE_BUFFERS 0x10L

/* where PySSLSocket keeps its socket's weak reference, its SSL and its context */
#define SOCKET_AT (sizeof(PyObject))
#define SSL_AT (SOCKET_AT + sizeof(void *))
#define CONTEXT_AT (SSL_AT + sizeof(void *))

/* how a read ended (tls_records.py has the same) */
enum { WANT = 0, CLOSED = 1, FAILED = 2, FULL = 3 };

static PyObject *py_setup(PyObject *self, PyObject *args) {
    PyObject *addresses, *type;
    int release_once;
    if (!PyArg_ParseTuple(args, "O!O!p", &PyTuple_Type, &addresses, &PyType_Type, &type,
                          &release_once))
        return NULL;
    if (PyTuple_GET_SIZE(addresses) != ADDRESSES) {
        PyErr_Format(PyExc_ValueError, "%d libssl function addresses are needed", ADDRESSES);
        return NULL;
    }
    void *a[ADDRESSES];
    for (int i = 0; i < ADDRESSES; i++) {
        a[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(addresses, i));
        if (!a[i]) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a libssl function's address is missing");
            return NULL;
        }
    }
    if (((PyTypeObject *)type)->tp_basicsize < (Py_ssize_t)(CONTEXT_AT + sizeof(void *))) {
        PyErr_SetString(PyExc_ValueError, "the _SSLSocket type is smaller than CPython's");
        return NULL;
    }
    fn.read_ex = (read_ex_f)a[0];
    fn.get_error = (get_error_f)a[1];
    fn.clear_error = (clear_error_f)a[2];
    fn.get_rbio = (get_rbio_f)a[3];
    fn.set0_rbio = (set0_rbio_f)a[4];
    fn.new_mem_buf = (new_mem_buf_f)a[5];
    fn.bio_ctrl = (bio_ctrl_f)a[6];
    fn.bio_up_ref = (bio_up_ref_f)a[7];
    fn.bio_write = (bio_write_f)a[8];
    fn.bio_free = (bio_free_f)a[9];
    fn.ssl_ctrl = (ssl_ctrl_f)a[10];
    fn.free_buffers = (free_buffers_f)a[11];
    fn.release_once = release_once;
    Py_XSETREF(fn.socket_type, (PyTypeObject *)Py_NewRef(type));
    Py_RETURN_NONE;
}

/* the records the SSL's read BIO holds, decrypted into out[*got..room); how it ended */
static int read_records(void *ssl, char *out, size_t room, size_t *got) {
    fn.clear_error();
    while (*got < room) {
        size_t n = 0;
        if (fn.read_ex(ssl, out + *got, room - *got, &n) == 1) {
            if (n == 0) /* never, by OpenSSL's word: not a loop that holds the GIL */
                return FAILED;
            *got += n;
            continue;
        }
        int error = fn.get_error(ssl, 0);
        return error == SSL_ERROR_WANT_READ     ? WANT
               : error == SSL_ERROR_ZERO_RETURN ? CLOSED
                                                : FAILED;
    }
    return FULL;
}

static PyObject *py_read(PyObject *self, PyObject *args) {
    PyObject *inner, *context;
    Py_ssize_t limit;
    Py_buffer data = {NULL};
    if (!PyArg_ParseTuple(args, "OOn|y*", &inner, &context, &limit, &data)) return NULL;
    PyObject *out = NULL;
    void *ssl, *incoming = NULL, *over = NULL;
    if (!fn.read_ex || !fn.socket_type) {
        PyErr_SetString(PyExc_RuntimeError, "_records_c.setup was not called");
        goto done;
    }
    if (Py_TYPE(inner) != fn.socket_type) {
        PyErr_SetString(PyExc_TypeError, "not an _ssl._SSLSocket");
        goto done;
    }
    char *base = (char *)inner;
    ssl = *(void **)(base + SSL_AT);
    if (*(void **)(base + SOCKET_AT) != NULL || ssl == NULL ||
        *(PyObject **)(base + CONTEXT_AT) != context) {
        PyErr_SetString(PyExc_ValueError, "not an SSLObject over memory BIOs of that context");
        goto done;
    }
    if (limit <= 0) {
        PyErr_SetString(PyExc_ValueError, "the limit must be positive");
        goto done;
    }
    if (data.buf) {
        if (data.len > INT_MAX) {
            PyErr_SetString(PyExc_ValueError, "more data than a BIO takes at once");
            goto done;
        }
        incoming = fn.get_rbio(ssl);
        if (!incoming || fn.bio_ctrl(incoming, BIO_CTRL_PENDING, 0, NULL) != 0) {
            PyErr_SetString(PyExc_ValueError, "the incoming BIO is not empty");
            goto done;
        }
    }
    out = PyBytes_FromStringAndSize(NULL, limit);
    if (!out) goto done;
    if (data.buf) {
        over = fn.new_mem_buf(data.buf, (int)data.len);
        if (!over || fn.bio_up_ref(incoming) != 1) {
            if (over) fn.bio_free(over);
            Py_CLEAR(out);
            PyErr_NoMemory();
            goto done;
        }
        fn.bio_ctrl(over, BIO_C_SET_BUF_MEM_EOF_RETURN, -1, NULL); /* empty: retry, not EOF */
        fn.set0_rbio(ssl, over); /* drops the SSL's reference to incoming: ours holds it */
    }
    /* CPython sets SSL_MODE_RELEASE_BUFFERS on its contexts: OpenSSL then frees its read
     * buffer after each record and allocates it again for the next, a malloc and a free of
     * about 17 KiB per 16 KiB record (1.3 % of a worker's time during uploads, issue #19).
     * The buffer is kept for the records of this call, then released once when all of them
     * were read (WANT: no plaintext is pending), with an OpenSSL whose SSL_free_buffers keeps
     * a buffer that holds the start of a record (setup's release_once: before the fix of
     * CVE-2024-4741 it freed one whose header was read and whose body was still to come, and
     * a client decides where its records are cut). With an older one the buffer stays until
     * a read with the mode set ends a record, or the connection ends. */
    long release = fn.ssl_ctrl(ssl, SSL_CTRL_MODE, 0, NULL) & SSL_MODE_RELEASE_BUFFERS;
    if (release) fn.ssl_ctrl(ssl, SSL_CTRL_CLEAR_MODE, release, NULL);
    size_t got = 0;
    int status = read_records(ssl, PyBytes_AS_STRING(out), (size_t)limit, &got);
    if (release) {
        fn.ssl_ctrl(ssl, SSL_CTRL_MODE, release, NULL);
        if (status == WANT && fn.release_once) fn.free_buffers(ssl);
    }
    int lost = 0;
    if (over) {
        char *left = NULL;
        long rest = fn.bio_ctrl(over, BIO_CTRL_INFO, 0, &left);
        if (rest > 0 && fn.bio_write(incoming, left, (int)rest) != (int)rest) lost = 1;
        fn.set0_rbio(ssl, incoming); /* our reference becomes the SSL's; over is freed */
    }
    if (lost) {
        Py_CLEAR(out);
        PyErr_NoMemory(); /* bytes of the stream are gone: the caller ends the connection */
        goto done;
    }
    if (_PyBytes_Resize(&out, (Py_ssize_t)got) != 0) goto done; /* out is NULL then */
    out = Py_BuildValue("(Ni)", out, status);
done:
    if (data.buf) PyBuffer_Release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"setup", py_setup, METH_VARARGS,
     "setup(addresses, socket_type): libssl's SSL_read_ex, SSL_get_error, ERR_clear_error, "
     "SSL_get_rbio, SSL_set0_rbio, BIO_new_mem_buf, BIO_ctrl, BIO_up_ref, BIO_write, BIO_free, "
     "SSL_ctrl, SSL_free_buffers; _ssl._SSLSocket; and whether SSL_free_buffers may be called "
     "after a read (an OpenSSL with the fix of CVE-2024-4741)"},
    {"read", py_read, METH_VARARGS,
     "read(inner, context, limit[, data]) -> (plaintext, how): every record the incoming BIO "
     "(or data, the BIO being empty) holds, decrypted, up to limit bytes; what is left of data "
     "goes into the BIO; how: 0 more is needed, 1 close_notify, 2 failed, 3 full"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT,
                                    "_records_c",
                                    "A connection's TLS records decrypted in one call.",
                                    -1,
                                    methods,
                                    NULL,
                                    NULL,
                                    NULL,
                                    NULL};

PyMODINIT_FUNC PyInit__records_c(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "WANT", WANT) || PyModule_AddIntConstant(m, "CLOSED", CLOSED) ||
        PyModule_AddIntConstant(m, "FAILED", FAILED) ||
        PyModule_AddIntConstant(m, "FULL", FULL)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
