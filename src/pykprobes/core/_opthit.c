/* The C twin of core/opthit.py: the optimized kprobe's inline hit (the kernel's optprobe
 * detour, with its bookkeeping in one C call). opthit.py's docstrings are the
 * specification; tests/core run both (dev.py runs the suite once more with
 * PYKPROBES_ACCELERATOR=off).
 *
 * Rewritten code calls a site's `enter` (a builtin bound to the site's Gate: a call of no
 * argument, which the eval loop specializes as a builtin's): it tests the marks, marks,
 * counts the hit in the probe's `nhit` slot (written directly, at the offset its member
 * descriptor gives, as _rethook.c writes it) and returns the site's
 * (handler, probe, regs); the injected code then calls the handler itself. Where the fast
 * path does not apply it calls the site's careful path and returns None.
 *
 * Every call runs with the GIL held, and from the tests to the mark no Python code runs:
 * a thread switch cannot fall between them. Never built on a free-threaded interpreter
 * (accelerator.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* ------------------------------------------------------------------ Gate */

typedef struct {
    PyObject_HEAD
    PyObject *held;    /* guard.held: a list of one item, never resized */
    PyObject *busy;    /* guard.busy: a dict */
    PyObject *careful; /* the site's careful path, called with no argument */
    PyObject *fast;    /* (handler, probe, regs), or None */
    PyTypeObject *kprobe; /* the class whose slot `nhit` is at `nhit` */
    Py_ssize_t nhit;   /* offset of a Kprobe's nhit slot */
    PyObject *probe;   /* the probe of the last fast hit (its fault is counted there) */
    long long serial;  /* fast hits through this gate (synchronize_hits) */
} Gate;

static PyTypeObject Gate_Type;

static PyObject *
Gate_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *held, *busy, *careful, *descr;
    if (!PyArg_ParseTuple(args, "O!O!OO!:Gate", &PyList_Type, &held, &PyDict_Type, &busy,
                          &careful, &PyMemberDescr_Type, &descr)) {
        return NULL;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX && member->type != T_OBJECT) {
        PyErr_SetString(PyExc_TypeError, "Gate: nhit must be an object slot");
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
    self->kprobe = (PyTypeObject *)Py_NewRef(
        (PyObject *)((PyDescrObject *)descr)->d_type);
    self->nhit = member->offset;
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
    Py_VISIT(self->kprobe);
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
    Py_CLEAR(self->kprobe);
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

/* publish(fast): what the next hit runs ((handler, probe, regs), or None). */
static PyObject *
Gate_publish(Gate *self, PyObject *fast)
{
    if (fast != Py_None && (!PyTuple_CheckExact(fast) || PyTuple_GET_SIZE(fast) != 3
                            || !PyObject_TypeCheck(PyTuple_GET_ITEM(fast, 1), self->kprobe))) {
        PyErr_SetString(PyExc_TypeError, "publish((handler, kprobe, regs) or None)");
        return NULL;
    }
    Py_SETREF(self->fast, Py_NewRef(fast));
    Py_RETURN_NONE;
}

/* p.nhit += 1, in the slot (an int; a new one past the small ints, as `+= 1` makes). */
static int
count_hit(PyObject *p, Py_ssize_t off)
{
    PyObject **slot = (PyObject **)((char *)p + off);
    PyObject *old = *slot;
    PyObject *new;
    if (old != NULL && PyLong_CheckExact(old)) {
        int overflow = 0;
        long long n = PyLong_AsLongLongAndOverflow(old, &overflow);
        if (!overflow && n < LLONG_MAX && !(n == -1 && PyErr_Occurred())) {
            new = PyLong_FromLongLong(n + 1);
        }
        else {
            PyErr_Clear();
            PyObject *one = PyLong_FromLong(1);
            new = one == NULL ? NULL : PyNumber_Add(old, one);
            Py_XDECREF(one);
        }
    }
    else {
        /* never set to an int by anyone but a user who assigned something else: restart */
        new = PyLong_FromLong(1);
    }
    if (new == NULL) {
        return -1;
    }
    *slot = new;
    Py_XDECREF(old);
    return 0;
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
    PyObject *p = PyTuple_GET_ITEM(fast, 1);
    if (count_hit(p, self->nhit) < 0) {
        PyErr_Clear(); /* out of memory: the count is lost, never the program */
    }
    self->serial++;
    Py_SETREF(self->probe, Py_NewRef(p));
    PyObject *prev = PyList_GET_ITEM(held, 0);
    PyList_SET_ITEM(held, 0, Py_NewRef(PyTuple_GET_ITEM(fast, 2)));
    Py_DECREF(prev);
    return Py_NewRef(fast);
}

static PyMethodDef enter_def = {
    "enter", (PyCFunction)(void (*)(void))Gate_enter, METH_FASTCALL,
    "enter() -> (handler, probe, regs) after marking and counting, or None after the "
    "careful path"};

/* bound(): `enter` bound to this gate (what rewritten code loads and calls). */
static PyObject *
Gate_bound(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyCFunction_NewEx(&enter_def, self, NULL);
}

static PyMethodDef Gate_methods[] = {
    {"publish", (PyCFunction)Gate_publish, METH_O,
     "publish(fast): what the next hit runs ((handler, kprobe, regs) or None)"},
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
    if (PyType_Ready(&Gate_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Gate", (PyObject *)&Gate_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
