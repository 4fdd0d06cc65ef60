/* The C twin of core/opthit.py: the optimized kprobe's inline hit (the kernel's optprobe
 * detour, with its bookkeeping in one C call). opthit.py's docstrings are the
 * specification; tests/core run both (dev.py runs the suite once more with
 * PYKPROBES_ACCELERATOR=off).
 *
 * Rewritten code calls a site's `enter` (a builtin bound to the site's Gate: a call of no
 * argument, which the eval loop specializes as a builtin's): it tests the marks, marks,
 * counts the hit in the probe's Counter (a C integer: no int allocated per hit) and
 * returns the site's (handler, probe, regs, held); the injected code then calls the handler
 * itself and clears the mark. Where the fast path does not apply it calls the site's careful
 * path and returns None.
 *
 * Every call runs with the GIL held, and from the tests to the mark no Python code runs:
 * a thread switch cannot fall between them. Never built on a free-threaded interpreter
 * (accelerator.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* ------------------------------------------------------------------ Counter */

/* A probe's inline hits (core/probe.py: its nhit adds them to the Python count). */
typedef struct {
    PyObject_HEAD
    long long n;
} Counter;

static PyMemberDef Counter_members[] = {
    {"n", T_LONGLONG, offsetof(Counter, n), READONLY, "hits counted by the inline hit"},
    {NULL},
};

static PyTypeObject Counter_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pykprobes.core._opthit.Counter",
    .tp_basicsize = sizeof(Counter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A probe's inline hit count (see opthit.py).",
    .tp_new = PyType_GenericNew,
    .tp_members = Counter_members,
};

/* ------------------------------------------------------------------ Gate */

typedef struct {
    PyObject_HEAD
    PyObject *held;    /* guard.held: a list of one item, never resized */
    PyObject *busy;    /* guard.busy: a dict */
    PyObject *careful; /* the site's careful path, called with no argument */
    PyObject *fast;    /* (handler, probe, regs, held), or None */
    Counter *counter;  /* the fast probe's Counter, or NULL */
    PyObject *probe;   /* the probe of the last fast hit (its fault is counted there) */
    long long serial;  /* fast hits through this gate (synchronize_hits) */
} Gate;

static PyTypeObject Gate_Type;

static PyObject *
Gate_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *held, *busy, *careful;
    if (!PyArg_ParseTuple(args, "O!O!O:Gate", &PyList_Type, &held, &PyDict_Type, &busy,
                          &careful)) {
        return NULL;
    }
    if (PyList_GET_SIZE(held) != 1) {
        PyErr_SetString(PyExc_ValueError, "Gate: held must be a list of one item");
        return NULL;
    }
    Gate *self = (Gate *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->held = Py_NewRef(held);
    self->busy = Py_NewRef(busy);
    self->careful = Py_NewRef(careful);
    self->fast = Py_NewRef(Py_None);
    self->probe = Py_NewRef(Py_None);
    return (PyObject *)self;
}

static int
Gate_traverse(Gate *self, visitproc visit, void *arg)
{
    Py_VISIT(self->held);
    Py_VISIT(self->busy);
    Py_VISIT(self->careful);
    Py_VISIT(self->fast);
    Py_VISIT(self->counter);
    Py_VISIT(self->probe);
    return 0;
}

static int
Gate_clear(Gate *self)
{
    Py_CLEAR(self->held);
    Py_CLEAR(self->busy);
    Py_CLEAR(self->careful);
    Py_CLEAR(self->fast);
    Py_CLEAR(self->counter);
    Py_CLEAR(self->probe);
    return 0;
}

static void
Gate_dealloc(Gate *self)
{
    PyObject_GC_UnTrack(self);
    Gate_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* publish(fast, counter): what the next hit runs ((handler, probe, regs, held) and the
 * probe's Counter, or None and None). */
static PyObject *
Gate_publish(Gate *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "publish(fast, counter)");
        return NULL;
    }
    PyObject *fast = args[0], *counter = args[1];
    if (fast == Py_None && counter == Py_None) {
        Py_SETREF(self->fast, Py_NewRef(Py_None));
        Py_CLEAR(self->counter);
        Py_RETURN_NONE;
    }
    if (!PyTuple_CheckExact(fast) || PyTuple_GET_SIZE(fast) != 4
        || PyTuple_GET_ITEM(fast, 3) != self->held || !Py_IS_TYPE(counter, &Counter_Type)) {
        PyErr_SetString(PyExc_TypeError, "publish((handler, probe, regs, held), Counter) "
                                         "or publish(None, None)");
        return NULL;
    }
    Py_XSETREF(self->counter, (Counter *)Py_NewRef(counter));
    Py_SETREF(self->fast, Py_NewRef(fast));
    Py_RETURN_NONE;
}

/* The hit: see the top of this file and opthit.py `Gate.enter`. */
static PyObject *
Gate_enter(PyObject *op, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    Gate *self = (Gate *)op;
    PyObject *fast = self->fast;
    PyObject *held = self->held;
    if (fast == Py_None || PyList_GET_ITEM(held, 0) != Py_None
        || PyDict_GET_SIZE(self->busy)) {
        PyObject *res = PyObject_CallNoArgs(self->careful);
        if (res == NULL) {
            return NULL;
        }
        Py_DECREF(res);
        Py_RETURN_NONE;
    }
    self->counter->n++;
    self->serial++;
    /* The mark before the probe's reference changes hands: dropping the last reference
     * to the previous probe could run Python code (a weakref callback), and with it a
     * thread switch, between the tests and the mark. The item replaced is None (tested). */
    PyList_SET_ITEM(held, 0, Py_NewRef(PyTuple_GET_ITEM(fast, 2)));
    Py_DECREF(Py_None);
    Py_SETREF(self->probe, Py_NewRef(PyTuple_GET_ITEM(fast, 1)));
    return Py_NewRef(fast);
}

static PyMethodDef enter_def = {
    "enter", (PyCFunction)(void (*)(void))Gate_enter, METH_FASTCALL,
    "enter() -> (handler, probe, regs, held) after marking and counting, or None after the "
    "careful path"};

/* bound(): `enter` bound to this gate (what rewritten code loads and calls). */
static PyObject *
Gate_bound(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyCFunction_NewEx(&enter_def, self, NULL);
}

static PyMethodDef Gate_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))Gate_publish, METH_FASTCALL,
     "publish(fast, counter): what the next hit runs"},
    {"bound", Gate_bound, METH_NOARGS, "enter bound to this gate"},
    {NULL},
};

static PyMemberDef Gate_members[] = {
    {"probe", T_OBJECT, offsetof(Gate, probe), READONLY, "the probe of the last fast hit"},
    {"serial", T_LONGLONG, offsetof(Gate, serial), READONLY, "fast hits through this gate"},
    {NULL},
};

static PyTypeObject Gate_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pykprobes.core._opthit.Gate",
    .tp_basicsize = sizeof(Gate),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A site's inline hit (see opthit.py).",
    .tp_new = Gate_new,
    .tp_dealloc = (destructor)Gate_dealloc,
    .tp_traverse = (traverseproc)Gate_traverse,
    .tp_clear = (inquiry)Gate_clear,
    .tp_methods = Gate_methods,
    .tp_members = Gate_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pykprobes.core._opthit",
    .m_doc = "The C twin of core/opthit.py.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__opthit(void)
{
    if (PyType_Ready(&Counter_Type) < 0 || PyType_Ready(&Gate_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Counter", (PyObject *)&Counter_Type) < 0
        || PyModule_AddObjectRef(m, "Gate", (PyObject *)&Gate_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
