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
 * Built only with the compiled build (setup.py); the interpreted one joins in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef int (*read_ex_f)(void *, void *, size_t, size_t *);
typedef int (*get_error_f)(const void *, int);
typedef void (*clear_error_f)(void);

static struct {
    read_ex_f read_ex;
    get_error_f get_error;
    clear_error_f clear_error;
    PyTypeObject *socket_type; /* _ssl._SSLSocket */
} fn;

/* OpenSSL's SSL_get_error codes */
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_ZERO_RETURN 6

/* where PySSLSocket keeps its socket's weak reference, its SSL and its context */
#define SOCKET_AT (sizeof(PyObject))
#define SSL_AT (SOCKET_AT + sizeof(void *))
#define CONTEXT_AT (SSL_AT + sizeof(void *))

/* how a read ended (tls_records.py has the same) */
enum { WANT = 0, CLOSED = 1, FAILED = 2, FULL = 3 };

static PyObject *py_setup(PyObject *self, PyObject *args) {
    unsigned long long a[3];
    PyObject *type;
    if (!PyArg_ParseTuple(args, "(KKK)O!", &a[0], &a[1], &a[2], &PyType_Type, &type))
        return NULL;
    for (int i = 0; i < 3; i++)
        if (!a[i]) {
            PyErr_SetString(PyExc_ValueError, "a libssl function's address is missing");
            return NULL;
        }
    if (((PyTypeObject *)type)->tp_basicsize < (Py_ssize_t)(CONTEXT_AT + sizeof(void *))) {
        PyErr_SetString(PyExc_ValueError, "the _SSLSocket type is smaller than CPython's");
        return NULL;
    }
    fn.read_ex = (read_ex_f)(uintptr_t)a[0];
    fn.get_error = (get_error_f)(uintptr_t)a[1];
    fn.clear_error = (clear_error_f)(uintptr_t)a[2];
    Py_XSETREF(fn.socket_type, (PyTypeObject *)Py_NewRef(type));
    Py_RETURN_NONE;
}

static PyObject *py_read(PyObject *self, PyObject *args) {
    PyObject *inner, *context;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "OOn", &inner, &context, &limit)) return NULL;
    if (!fn.read_ex || !fn.socket_type) {
        PyErr_SetString(PyExc_RuntimeError, "_records_c.setup was not called");
        return NULL;
    }
    if (Py_TYPE(inner) != fn.socket_type) {
        PyErr_SetString(PyExc_TypeError, "not an _ssl._SSLSocket");
        return NULL;
    }
    char *base = (char *)inner;
    void *ssl = *(void **)(base + SSL_AT);
    if (*(void **)(base + SOCKET_AT) != NULL || ssl == NULL ||
        *(PyObject **)(base + CONTEXT_AT) != context) {
        PyErr_SetString(PyExc_ValueError, "not an SSLObject over memory BIOs of that context");
        return NULL;
    }
    if (limit <= 0) {
        PyErr_SetString(PyExc_ValueError, "the limit must be positive");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, limit);
    if (!out) return NULL;
    char *data = PyBytes_AS_STRING(out);
    size_t got = 0, room = (size_t)limit;
    int status = FULL;
    fn.clear_error();
    while (got < room) {
        size_t n = 0;
        if (fn.read_ex(ssl, data + got, room - got, &n) == 1) {
            if (n == 0) { /* never, by OpenSSL's word: not a loop that holds the GIL */
                status = FAILED;
                break;
            }
            got += n;
            continue;
        }
        int error = fn.get_error(ssl, 0);
        status = error == SSL_ERROR_WANT_READ     ? WANT
                 : error == SSL_ERROR_ZERO_RETURN ? CLOSED
                                                  : FAILED;
        break;
    }
    if (_PyBytes_Resize(&out, (Py_ssize_t)got) != 0) return NULL;
    return Py_BuildValue("(Ni)", out, status);
}

static PyMethodDef methods[] = {
    {"setup", py_setup, METH_VARARGS,
     "setup(addresses, socket_type): libssl's SSL_read_ex, SSL_get_error and ERR_clear_error, "
     "and _ssl._SSLSocket"},
    {"read", py_read, METH_VARARGS,
     "read(inner, context, limit) -> (plaintext, how): every record the incoming BIO holds, "
     "decrypted, up to limit bytes; how: 0 more is needed, 1 close_notify, 2 failed, 3 full"},
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
