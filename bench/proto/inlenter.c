/* Bench-only prototype (bench/suite.py row X2), not pykprobes code: the optimized hit's
   bookkeeping (test the marks, mark, count nhit) in one C call, `enter(box)`, which returns
   the site's (handler, p, regs) or None; the injected bytecode then calls the handler itself
   (a Python-to-Python call the eval loop inlines) and clears the mark. Built by the suite. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

static PyObject *held, *busy;
static Py_ssize_t off = -1;
/* enter_c's count: a C integer, read by `counted()` (where a probe's nhit would add it) */
static long long counted;

static PyObject *
setup(PyObject *m, PyObject *args)
{
    PyObject *h, *b, *d;
    if (!PyArg_ParseTuple(args, "O!O!O", &PyList_Type, &h, &PyDict_Type, &b, &d))
        return NULL;
    if (Py_TYPE(d) != &PyMemberDescr_Type) {
        PyErr_SetString(PyExc_TypeError, "a slot's member descriptor");
        return NULL;
    }
    Py_XSETREF(held, Py_NewRef(h));
    Py_XSETREF(busy, Py_NewRef(b));
    off = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_RETURN_NONE;
}

/* The tests; the site's (handler, p, regs) if they pass, else NULL (None returned). */
static inline PyObject *
fast_of(PyObject *box)
{
    PyObject *fast = PyList_GET_ITEM(box, 0);
    if (fast == Py_None || PyList_GET_ITEM(held, 0) != Py_None || PyDict_GET_SIZE(busy))
        return NULL;
    return fast;
}

static inline PyObject *
mark(PyObject *fast)
{
    PyObject *prev = PyList_GET_ITEM(held, 0);
    PyList_SET_ITEM(held, 0, Py_NewRef(PyTuple_GET_ITEM(fast, 2)));
    Py_DECREF(prev);
    return Py_NewRef(fast);
}

/* Count in the probe's nhit slot (a Python int: one allocated per hit above 256). */
static PyObject *
enter(PyObject *m, PyObject *box)
{
    PyObject *fast = fast_of(box);
    if (fast == NULL)
        Py_RETURN_NONE;
    PyObject **slot = (PyObject **)((char *)PyTuple_GET_ITEM(fast, 1) + off);
    PyObject *old = *slot;
    long long n = PyLong_AsLongLong(old);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    PyObject *nw = PyLong_FromLongLong(n + 1);
    if (nw == NULL)
        return NULL;
    *slot = nw;
    Py_DECREF(old);
    return mark(fast);
}

/* Count in a C integer instead (no allocation). */
static PyObject *
enter_c(PyObject *m, PyObject *box)
{
    PyObject *fast = fast_of(box);
    if (fast == NULL)
        Py_RETURN_NONE;
    counted++;
    return mark(fast);
}

/* enter_c bound to one site's box: the injected code loads and calls one object. */
static PyObject *
enter_bound(PyObject *box, PyObject *const *args, Py_ssize_t nargs)
{
    return enter_c(NULL, box);
}

static PyMethodDef enter_bound_def = {"enter", (PyCFunction)(void (*)(void))enter_bound,
                                      METH_FASTCALL, NULL};

static PyObject *
gate(PyObject *m, PyObject *box)
{
    return PyCFunction_NewEx(&enter_bound_def, box, NULL);
}

static PyObject *
counted_get(PyObject *m, PyObject *unused)
{
    return PyLong_FromLongLong(counted);
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS, NULL},
    {"enter", enter, METH_O, NULL},
    {"enter_c", enter_c, METH_O, NULL},
    {"counted", counted_get, METH_NOARGS, NULL},
    {"gate", gate, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "inlenter", NULL, -1, methods};

PyMODINIT_FUNC PyInit_inlenter(void) { return PyModule_Create(&mod); }
