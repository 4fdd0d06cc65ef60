/* The C twin of trace/hist.py HistRecorder's simple case: the rewritten code of a hist-only
 * event calls it with the event's argument values, and it counts one hit into the trigger's
 * table, keyed by one of them (hist.py's docstrings are the contract; the pure-Python
 * closures are the fallback, chosen with the rest of the trace core by backend.py).
 *
 *   HistCounter(busy, held, entries, insert, convert, nargs, index, log2=False)
 *   counter(*values) -> True: the careful path must run instead (off, a handler running in
 *                       some thread, not the values it was made for, or anything failed);
 *                       False: counted (entries[key][0] += 1, or a drop counted by insert)
 *
 * The key is values[index] when it is an exact int, else convert(values[index]) (the
 * fetcharg's conversion: no object of the program is kept). With `log2` (the key's .log2
 * modifier: hist.py _log2, ilog2(roundup_pow_of_two(v))), an int key from 0 to 2**63-1 is
 * counted under its log2; any other key goes to the careful path. A log2 bucket whose entry it
 * has counted into once is counted apart (`pending`, no lookup and no int object per hit: a
 * latency histogram's hit) until HistMap reads or clears the table (`flush`, `forget`;
 * histmap.py `counters`). A log2 counter of one value also offers `count_ns` (a capsule) to
 * core/_rethook.c, which counts a $duration through it without an int object or a call. A key
 * not in `entries` goes
 * through `insert(key)` (HistMap.insert: the table's bound and its drops), the rare path.
 * The GIL makes each call atomic with respect to the other hit paths (the build that has no
 * GIL takes the Python fallback).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

/* ilog2(roundup_pow_of_two(v)) of 0 <= v < 2**63: 0..63. */
#define LOG2_BUCKETS 64

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    char fast;
    long long nhit;
    Py_ssize_t nargs;
    Py_ssize_t index;
    char log2;
    PyObject *busy;    /* core.guard.busy */
    PyObject *held;    /* core.guard.held */
    PyObject *entries; /* HistMap.entries */
    PyObject *insert;  /* HistMap.insert */
    PyObject *convert; /* the key fetcharg's converter */
    /* log2: each bucket's entry once counted into, and the hits counted to it since that
     * are not in its entry[0] yet (`flush` adds them: HistMap does before it reads). */
    PyObject *cached[LOG2_BUCKETS];
    long long pending[LOG2_BUCKETS];
    PyObject *weakreflist;
} HistCounter;

static int
count_one(PyObject *entry)
{
    if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) < 1) {
        return -1;
    }
    PyObject *old = PyList_GET_ITEM(entry, 0);
    PyObject *new;
    int overflow = 0;
    long long n = PyLong_CheckExact(old) ? PyLong_AsLongLongAndOverflow(old, &overflow) : -1;
    if (PyLong_CheckExact(old) && !overflow && n < LLONG_MAX && !(n == -1 && PyErr_Occurred())) {
        new = PyLong_FromLongLong(n + 1);
    }
    else {
        PyErr_Clear();
        PyObject *one = PyLong_FromLong(1);
        if (one == NULL) {
            return -1;
        }
        new = PyNumber_Add(old, one);
        Py_DECREF(one);
    }
    if (new == NULL) {
        return -1;
    }
    PyList_SET_ITEM(entry, 0, new);
    Py_DECREF(old); /* an int: no finalizer, no code of the program */
    return 0;
}

/* Count one hit under `key` (a reference it takes): entries[key][0] += 1, or a drop counted
 * by insert; the entry is kept in `*cache` unless NULL. 0: counted, -1: failed (an error
 * set). */
static int
count_key(HistCounter *self, PyObject *key, PyObject **cache)
{
    PyObject *entry = PyDict_GetItemWithError(self->entries, key);
    if (entry != NULL) {
        Py_INCREF(entry);
    }
    else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    else {
        entry = PyObject_CallOneArg(self->insert, key);
        if (entry == NULL) {
            Py_DECREF(key);
            return -1;
        }
        if (entry == Py_None) { /* the table is full: a drop, counted by insert */
            Py_DECREF(entry);
            Py_DECREF(key);
            self->nhit++;
            return 0;
        }
    }
    Py_DECREF(key);
    int failed = count_one(entry);
    if (!failed && cache != NULL) {
        Py_XSETREF(*cache, Py_NewRef(entry));
    }
    Py_DECREF(entry);
    if (failed) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "a hist entry is not a list");
        }
        return -1;
    }
    self->nhit++;
    return 0;
}

/* Whether a hit may be counted here: on, and no handler running in any thread. */
static inline int
may_count(HistCounter *self)
{
    return self->fast && !PyDict_GET_SIZE(self->busy) && PyList_GET_ITEM(self->held, 0) == Py_None;
}

/* Count one hit under the log2 bucket of `v` (ilog2(roundup_pow_of_two(v))). 0: counted,
 * 1: the careful path's (negative), -1: failed (an error set). */
static int
count_log2(HistCounter *self, long long v)
{
    if (v < 0) {
        return 1;
    }
    int bits = v > 1 ? 64 - __builtin_clzll((unsigned long long)(v - 1)) : 0;
    if (self->cached[bits] != NULL && self->pending[bits] < LLONG_MAX) {
        /* Its entry is known: no lookup, no int object (a latency histogram's hit). */
        self->pending[bits]++;
        self->nhit++;
        return 0;
    }
    PyObject *key = PyLong_FromLong(bits); /* 0..63: a small int, no allocation */
    if (key == NULL) {
        return -1;
    }
    return count_key(self, key, &self->cached[bits]);
}

static PyObject *
HistCounter_call(HistCounter *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (!may_count(self) || kwnames != NULL || n != self->nargs) {
        Py_RETURN_TRUE;
    }
    PyObject *key = args[self->index];
    if (PyLong_CheckExact(key)) {
        Py_INCREF(key);
    }
    else {
        key = PyObject_CallOneArg(self->convert, key);
        if (key == NULL) {
            PyErr_Clear();
            Py_RETURN_TRUE;
        }
    }
    int done;
    if (self->log2) {
        int overflow = 0;
        long long v = PyLong_CheckExact(key) ? PyLong_AsLongLongAndOverflow(key, &overflow) : -1;
        Py_DECREF(key);
        /* not an int, negative or huge: the careful path's */
        done = overflow ? 1 : count_log2(self, v);
    }
    else {
        done = count_key(self, key, NULL);
    }
    if (done) {
        PyErr_Clear();
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* The duration entry of a log2 counter of one value (core/_rethook.c, its `count_ns`
 * capsule): counter(ns) without an int object or a call. 0: counted, 1: the careful path's
 * (no error set). */
static int
count_ns(PyObject *counter, int64_t ns)
{
    HistCounter *self = (HistCounter *)counter;
    if (!may_count(self)) {
        return 1;
    }
    if (count_log2(self, (long long)ns)) {
        PyErr_Clear();
        return 1;
    }
    return 0;
}

/* Add the pending hits into their entries' hitcounts. 0, or -1 with an error set (what
 * could not be added stays pending). */
static int
flush_pending(HistCounter *self)
{
    for (int b = 0; b < LOG2_BUCKETS; b++) {
        PyObject *entry = self->cached[b];
        long long n = self->pending[b];
        if (n == 0 || entry == NULL) {
            continue;
        }
        if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) < 1) {
            PyErr_SetString(PyExc_TypeError, "a hist entry is not a list");
            return -1;
        }
        PyObject *add = PyLong_FromLongLong(n);
        if (add == NULL) {
            return -1;
        }
        PyObject *old = PyList_GET_ITEM(entry, 0);
        PyObject *new = PyNumber_Add(old, add); /* ints: no code of the program runs */
        Py_DECREF(add);
        if (new == NULL) {
            return -1;
        }
        PyList_SET_ITEM(entry, 0, new);
        Py_DECREF(old);
        self->pending[b] = 0;
    }
    return 0;
}

/* Forget the entries (the table was cleared: what was pending went with it). */
static void
forget_entries(HistCounter *self)
{
    for (int b = 0; b < LOG2_BUCKETS; b++) {
        self->pending[b] = 0;
        Py_CLEAR(self->cached[b]);
    }
}

static PyObject *
HistCounter_flush(HistCounter *self, PyObject *unused)
{
    if (flush_pending(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
HistCounter_forget(HistCounter *self, PyObject *unused)
{
    forget_entries(self);
    Py_RETURN_NONE;
}

static PyMethodDef HistCounter_methods[] = {
    {"flush", (PyCFunction)HistCounter_flush, METH_NOARGS,
     "flush(): add the hits counted since the last flush into their entries"},
    {"forget", (PyCFunction)HistCounter_forget, METH_NOARGS,
     "forget(): the table was cleared; forget its entries and what was not flushed"},
    {NULL},
};

static PyObject *
HistCounter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"busy", "held", "entries", "insert", "convert", "nargs", "index",
                             "log2", NULL};
    PyObject *busy, *held, *entries, *insert, *convert;
    Py_ssize_t nargs, index;
    int log2 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!OOnn|p:HistCounter", kwlist,
                                     &PyDict_Type, &busy, &PyList_Type, &held, &PyDict_Type,
                                     &entries, &insert, &convert, &nargs, &index, &log2)) {
        return NULL;
    }
    /* Never resized by its owner (core/site.py): item 0 is read without a check. */
    if (PyList_GET_SIZE(held) != 1) {
        PyErr_SetString(PyExc_TypeError, "held must be a list of one item");
        return NULL;
    }
    if (!PyCallable_Check(insert) || !PyCallable_Check(convert)) {
        PyErr_SetString(PyExc_TypeError, "insert and convert must be callable");
        return NULL;
    }
    if (index < 0 || index >= nargs) {
        PyErr_SetString(PyExc_ValueError, "index must be one of the values");
        return NULL;
    }
    HistCounter *self = (HistCounter *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)HistCounter_call;
    self->nargs = nargs;
    self->index = index;
    self->log2 = (char)log2;
    self->busy = Py_NewRef(busy);
    self->held = Py_NewRef(held);
    self->entries = Py_NewRef(entries);
    self->insert = Py_NewRef(insert);
    self->convert = Py_NewRef(convert);
    return (PyObject *)self;
}

static int
HistCounter_traverse(HistCounter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->busy);
    Py_VISIT(self->held);
    Py_VISIT(self->entries);
    Py_VISIT(self->insert);
    Py_VISIT(self->convert);
    for (int b = 0; b < LOG2_BUCKETS; b++) {
        Py_VISIT(self->cached[b]);
    }
    return 0;
}

static int
HistCounter_clear(HistCounter *self)
{
    /* Its last hits go into the table (the counter goes when its event changes). */
    if (flush_pending(self) < 0) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    forget_entries(self);
    Py_CLEAR(self->busy);
    Py_CLEAR(self->held);
    Py_CLEAR(self->entries);
    Py_CLEAR(self->insert);
    Py_CLEAR(self->convert);
    return 0;
}

static void
HistCounter_dealloc(HistCounter *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    HistCounter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
HistCounter_get_fast(HistCounter *self, void *c)
{
    return PyBool_FromLong(self->fast);
}

static int
HistCounter_set_fast(HistCounter *self, PyObject *v, void *c)
{
    int truth = v == NULL ? 0 : PyObject_IsTrue(v);
    if (truth < 0) {
        return -1;
    }
    self->fast = (char)truth;
    return 0;
}

static PyObject *
HistCounter_get_nhit(HistCounter *self, void *c)
{
    return PyLong_FromLongLong(self->nhit);
}

/* The name core/_rethook.c looks for: a capsule of `int (*)(PyObject *, int64_t)`. */
#define COUNT_NS_CAPSULE "pykprobes.count_ns"

/* A log2 counter of one value offers `count_ns` to the rethook (a latency histogram's
 * $duration); any other, None. */
static PyObject *
HistCounter_get_count_ns(HistCounter *self, void *c)
{
    if (!self->log2 || self->nargs != 1) {
        Py_RETURN_NONE;
    }
    return PyCapsule_New((void *)count_ns, COUNT_NS_CAPSULE, NULL);
}

static PyGetSetDef HistCounter_getset[] = {
    {"count_ns", (getter)HistCounter_get_count_ns, NULL, NULL, NULL},
    {"fast", (getter)HistCounter_get_fast, (setter)HistCounter_set_fast, NULL, NULL},
    {"nhit", (getter)HistCounter_get_nhit, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject HistCounter_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pykprobes.trace._histcount.HistCounter",
    .tp_basicsize = sizeof(HistCounter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "The compiled hit of a hist-only event (see hist.py HistRecorder).",
    .tp_new = HistCounter_new,
    .tp_dealloc = (destructor)HistCounter_dealloc,
    .tp_traverse = (traverseproc)HistCounter_traverse,
    .tp_clear = (inquiry)HistCounter_clear,
    .tp_getset = HistCounter_getset,
    .tp_methods = HistCounter_methods,
    .tp_weaklistoffset = offsetof(HistCounter, weakreflist),
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(HistCounter, vectorcall),
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pykprobes.trace._histcount",
    .m_doc = "The C twin of hist.py's compiled hit (see hist.py HistRecorder).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__histcount(void)
{
    if (PyType_Ready(&HistCounter_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "HistCounter", (PyObject *)&HistCounter_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
