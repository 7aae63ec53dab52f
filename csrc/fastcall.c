/* salr._fastcall: CPython bindings of the fused decode entry points of salr._bitmap_cpu.

Decoding calls one SALR layer ~200 times per generated token, and ctypes converts each call's 22 arguments: 5.2 us a
call against 2.9 us through this binding, for a 64x64 layer whose kernel itself takes ~2.5 us (measured, 1 thread).
These METH_FASTCALL functions take the same arguments as plain Python ints / floats / None and call the kernel
through a function pointer that salr.ops.cpu binds from the ctypes library, so both paths run the very same code.
Optional: without Python's headers setup.py skips it and salr keeps the ctypes calls. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef int64_t (*linear_decode_fn)(int, int, const uint8_t *, const void *, const int64_t *, int64_t, int64_t,
                                    int64_t, int, const void *, int64_t, int64_t, int, int64_t, int64_t, float,
                                    const void *, const void *, const void *, void *, int64_t, int);
typedef int64_t (*qlinear_decode_fn)(int, int, const uint8_t *, const void *, const float *, int64_t,
                                     const int64_t *, int64_t, int64_t, int64_t, int, const void *, int64_t, int64_t,
                                     int, int64_t, int64_t, float, const void *, const void *, const void *, void *,
                                     int64_t, int);

static linear_decode_fn linear_decode = NULL;
static qlinear_decode_fn qlinear_decode = NULL;

/* Argument kinds: 'i' a C int, 'l' an int64, 'p' a pointer (an int address or None), 'f' a float. */
typedef union {
    long long l;
    void *p;
    double f;
} arg_t;

static int parse(PyObject *const *args, Py_ssize_t nargs, const char *kinds, arg_t *out) {
    const Py_ssize_t n = (Py_ssize_t)strlen(kinds);
    if (nargs != n) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", n, nargs);
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = args[i];
        switch (kinds[i]) {
        case 'p':
            out[i].p = a == Py_None ? NULL : PyLong_AsVoidPtr(a);
            break;
        case 'f':
            out[i].f = PyFloat_AsDouble(a);
            break;
        case 'i': {
            const long long v = PyLong_AsLongLong(a);
            if (!PyErr_Occurred() && (v < INT32_MIN || v > INT32_MAX))
                PyErr_Format(PyExc_OverflowError, "argument %zd does not fit a C int", i);
            out[i].l = v;
            break;
        }
        default:
            out[i].l = PyLong_AsLongLong(a);
        }
        if (PyErr_Occurred()) return 0;
    }
    return 1;
}

/* Whether the entry point `fn` is bound and args parse as `kinds` into a; else a Python error is set. */
static int ready(const void *fn, PyObject *const *args, Py_ssize_t nargs, const char *kinds, arg_t *a) {
    if (!fn) {
        PyErr_SetString(PyExc_RuntimeError, "salr._fastcall is not bound to the kernel");
        return 0;
    }
    return parse(args, nargs, kinds, a);
}

#define I(k) ((int)a[k].l)
#define L(k) ((int64_t)a[k].l)
#define P(k) (a[k].p)
#define F(k) ((float)a[k].f)

static PyObject *call_linear_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    arg_t a[22];
    if (!ready((const void *)linear_decode, args, nargs, "iippplllipllillfppppli", a)) return NULL;
    int64_t r;
    Py_BEGIN_ALLOW_THREADS;
    r = linear_decode(I(0), I(1), P(2), P(3), P(4), L(5), L(6), L(7), I(8), P(9), L(10), L(11), I(12), L(13), L(14),
                      F(15), P(16), P(17), P(18), P(19), L(20), I(21));
    Py_END_ALLOW_THREADS;
    return PyLong_FromLongLong(r);
}

static PyObject *call_qlinear_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    arg_t a[24];
    if (!ready((const void *)qlinear_decode, args, nargs, "iippplplllipllillfppppli", a)) return NULL;
    int64_t r;
    Py_BEGIN_ALLOW_THREADS;
    r = qlinear_decode(I(0), I(1), P(2), P(3), P(4), L(5), P(6), L(7), L(8), L(9), I(10), P(11), L(12), L(13), I(14),
                       L(15), L(16), F(17), P(18), P(19), P(20), P(21), L(22), I(23));
    Py_END_ALLOW_THREADS;
    return PyLong_FromLongLong(r);
}

static PyObject *bind(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *lin, *qlin;
    if (!PyArg_ParseTuple(args, "OO", &lin, &qlin)) return NULL;
    void *l = PyLong_AsVoidPtr(lin), *q = PyLong_AsVoidPtr(qlin);
    if (PyErr_Occurred()) return NULL;
    if (!l || !q) return PyErr_Format(PyExc_ValueError, "bind needs two non-null function addresses");
    linear_decode = (linear_decode_fn)l;
    qlinear_decode = (qlinear_decode_fn)q;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS,
     "bind(linear_decode_address, qlinear_decode_address): the kernel entry points (from the ctypes library)."},
    {"linear_decode", (PyCFunction)(void (*)(void))call_linear_decode, METH_FASTCALL,
     "salr_linear_decode's 22 arguments (ints, pointers as ints or None, one float) -> its int64 result."},
    {"qlinear_decode", (PyCFunction)(void (*)(void))call_qlinear_decode, METH_FASTCALL,
     "salr_qlinear_decode's 24 arguments -> its int64 result."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_fastcall", .m_doc = NULL, .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__fastcall(void) { return PyModule_Create(&module); }
