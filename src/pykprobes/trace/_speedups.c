/* The C accelerator of the trace hot path: the twin of ring.py, recorder.py and
 * cmdlines.py_thread_key, with the very same behaviour (their docstrings are the
 * specification; tests/trace run both). backend.py chooses between them.
 *
 * Why C: a compiled event's record (clock, thread, values) written by one C call costs
 * about one unprobed call; from bytecode the clock read alone costs that much
 * (bench/results/ANALYSIS.md, "The event").
 *
 * Every operation runs with the GIL held and without running Python code until it is
 * done with the ring (decrefs of evicted entries free only exact builtin values or an
 * event still referenced elsewhere; `wake` is called last): the GIL is the ring's lock.
 * backend.py never chooses this module on a free-threaded build.
 *
 * Public C API only (3.11-3.13); PyThreadState_GetID is public since 3.9.
 *
 * One more piece serves the core, not the trace layer: `Untraced` (below), which runs a
 * breakpoint's hit with CPython's tracing flag lowered, so that probes hit by its handlers
 * are seen. It is here because this is the package's one C extension, chosen (or not) once
 * by accelerator.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <time.h>

#define OVERHEAD 24   /* buffer.py RECORD_OVERHEAD */
#define SCALAR 8      /* buffer.py SCALAR_SIZE */
#define DATA_LOC 4    /* buffer.py DATA_LOC_SIZE */
#define RETURN_EXTRA 8 /* buffer.py RETURN_OVERHEAD: a return record's caller */
#define STR_CAP 256   /* safe.py STR_CAP */

enum { KIND_CONVERT, KIND_DESCRIBE, KIND_INT, KIND_FLOAT, KIND_STR };

/* ------------------------------------------------------------------ thread keys */

static PyObject *note_fn = NULL;    /* cmdlines.note */
static PyObject *saved_dict = NULL; /* cmdlines.saved */
static uint64_t last_id = 0;
static PyObject *last_key = NULL;

/* The key (borrowed) of the calling thread, whose state is `ts`, noted in `saved` at its
 * first record; NULL only on a memory error (with the error cleared). */
static PyObject *
current_key(PyThreadState *ts)
{
    uint64_t id = PyThreadState_GetID(ts);
    if (id == last_id && last_key != NULL) {
        return last_key;
    }
    PyObject *key = PyLong_FromUnsignedLongLong(id);
    if (key == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (saved_dict != NULL && note_fn != NULL) {
        int has = PyDict_Contains(saved_dict, key);
        if (has == 0) {
            PyObject *r = PyObject_CallOneArg(note_fn, key);
            if (r == NULL) {
                PyErr_Clear();
            }
            Py_XDECREF(r);
        }
        else if (has < 0) {
            PyErr_Clear();
        }
    }
    Py_XSETREF(last_key, key);
    last_id = id;
    return key;
}

static int64_t
monotonic_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t); /* time.monotonic_ns() on Linux */
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* ------------------------------------------------------------------ Ring */

typedef struct {
    int64_t seq;
    int64_t ts;
    PyObject *key;
    PyObject *event;
    PyObject *values;
    PyObject *caller; /* NULL: None */
    Py_ssize_t size;
} Entry;

typedef struct {
    PyObject_HEAD
    Entry *buf;
    Py_ssize_t cap, head, len;
    Py_ssize_t bytes, limit;
    int64_t next_seq, read_seq, overrun, dropped;
    char tracing_on, overwrite, waiting;
    PyObject *wake;
} Ring;

static PyTypeObject Ring_Type;

static void
entry_clear(Entry *e)
{
    Py_CLEAR(e->key);
    Py_CLEAR(e->event);
    Py_CLEAR(e->values);
    Py_CLEAR(e->caller);
}

/* Remove the oldest entry; its references are dropped after the ring is consistent. */
static void
ring_pop(Ring *r)
{
    Entry e = r->buf[r->head];
    memset(&r->buf[r->head], 0, sizeof(Entry));
    r->head = (r->head + 1) % r->cap;
    r->len--;
    r->bytes -= e.size;
    entry_clear(&e);
}

static int
ring_grow(Ring *r)
{
    Py_ssize_t cap = r->cap ? r->cap * 2 : 64;
    Entry *buf = PyMem_Calloc((size_t)cap, sizeof(Entry));
    if (buf == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < r->len; i++) {
        buf[i] = r->buf[(r->head + i) % r->cap];
    }
    PyMem_Free(r->buf);
    r->buf = buf;
    r->cap = cap;
    r->head = 0;
    return 0;
}

static void
ring_wake(Ring *r)
{
    if (!r->waiting) {
        return;
    }
    r->waiting = 0;
    if (r->wake != NULL && r->wake != Py_None) {
        PyObject *wake = Py_NewRef(r->wake);
        PyObject *res = PyObject_CallNoArgs(wake);
        if (res == NULL) {
            PyErr_Clear(); /* a write never raises */
        }
        Py_XDECREF(res);
        Py_DECREF(wake);
    }
}

/* Store an entry (references borrowed); 1 stored, 0 refused. Never raises. */
static int
ring_put(Ring *r, int64_t ts, PyObject *key, PyObject *event, PyObject *values,
         PyObject *caller, Py_ssize_t size)
{
    if (!r->tracing_on) {
        return 0;
    }
    int64_t seq = r->next_seq++;
    int stored = 1;
    if (r->bytes + size > r->limit) {
        if (!r->overwrite || size > r->limit) {
            r->dropped++;
            stored = 0;
        }
        else {
            while (r->bytes + size > r->limit && r->len) {
                ring_pop(r);
                r->overrun++;
            }
        }
    }
    if (stored && r->len == r->cap && ring_grow(r) < 0) {
        r->dropped++; /* no memory for it: lost, as a refused record */
        stored = 0;
    }
    if (stored) {
        Entry *e = &r->buf[(r->head + r->len) % r->cap];
        e->seq = seq;
        e->ts = ts;
        e->key = Py_NewRef(key);
        e->event = Py_NewRef(event);
        e->values = Py_NewRef(values);
        e->caller = caller == Py_None ? NULL : Py_XNewRef(caller);
        e->size = size;
        r->len++;
        r->bytes += size;
    }
    ring_wake(r);
    return stored;
}

static int
check_limit(PyObject *obj, Py_ssize_t *out)
{
    if (!PyLong_CheckExact(obj)) {
        PyErr_Format(PyExc_ValueError, "limit must be a positive int, not %R", obj);
        return -1;
    }
    Py_ssize_t v = PyLong_AsSsize_t(obj);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < 1) {
        PyErr_Format(PyExc_ValueError, "limit must be a positive int, not %R", obj);
        return -1;
    }
    *out = v;
    return 0;
}

static PyObject *
Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"limit", "overwrite", NULL};
    PyObject *limit;
    int overwrite = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|p:Ring", kwlist, &limit, &overwrite)) {
        return NULL;
    }
    Py_ssize_t lim;
    if (check_limit(limit, &lim) < 0) {
        return NULL;
    }
    Ring *r = (Ring *)type->tp_alloc(type, 0);
    if (r == NULL) {
        return NULL;
    }
    r->limit = lim;
    r->overwrite = (char)overwrite;
    r->tracing_on = 1;
    return (PyObject *)r;
}

static int
Ring_traverse(Ring *r, visitproc visit, void *arg)
{
    for (Py_ssize_t i = 0; i < r->len; i++) {
        Entry *e = &r->buf[(r->head + i) % r->cap];
        Py_VISIT(e->key);
        Py_VISIT(e->event);
        Py_VISIT(e->values);
        Py_VISIT(e->caller);
    }
    Py_VISIT(r->wake);
    return 0;
}

static int
Ring_clear_refs(Ring *r)
{
    while (r->len) {
        ring_pop(r);
    }
    Py_CLEAR(r->wake);
    return 0;
}

static void
Ring_dealloc(Ring *r)
{
    PyObject_GC_UnTrack(r);
    Ring_clear_refs(r);
    PyMem_Free(r->buf);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *
Ring_append(Ring *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "append(ts, key, event, values, caller, size) takes 6 arguments");
        return NULL;
    }
    int64_t ts = PyLong_AsLongLong(args[0]);
    Py_ssize_t size = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyBool_FromLong(ring_put(r, ts, args[1], args[2], args[3], args[4], size));
}

static PyObject *
entry_tuple(Entry *e)
{
    return Py_BuildValue("(LLOOOOn)", (long long)e->seq, (long long)e->ts, e->key, e->event,
                         e->values, e->caller ? e->caller : Py_None, e->size);
}

/* Why reads copy or detach the entries before making any object: making a tuple may run the
 * garbage collector, whose finalizers and weakref callbacks are Python code, during which the
 * eval loop lets other threads in; a writer there may grow the ring (a new buffer) or pop its
 * oldest entries, under a reader still walking the old indices (seen as an abort in
 * tests/trace/test_buffer_threads.py under load). Copying the Entry structs and taking
 * references runs no Python code (PyMem_Malloc never starts a collection). */

/* The ring's entries, oldest first, with new references (`*n` of them); NULL: no memory. */
static Entry *
ring_copy(Ring *r, Py_ssize_t *n)
{
    Entry *copy = PyMem_Malloc((size_t)(r->len ? r->len : 1) * sizeof(Entry));
    if (copy == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < r->len; i++) {
        Entry *e = &copy[i];
        *e = r->buf[(r->head + i) % r->cap];
        Py_INCREF(e->key);
        Py_INCREF(e->event);
        Py_INCREF(e->values);
        Py_XINCREF(e->caller);
    }
    *n = r->len;
    return copy;
}

/* Move every entry out of the ring (their references with them): the ring is empty after. */
static Entry *
ring_detach(Ring *r, Py_ssize_t *n)
{
    Entry *out = PyMem_Malloc((size_t)(r->len ? r->len : 1) * sizeof(Entry));
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < r->len; i++) {
        Entry *e = &r->buf[(r->head + i) % r->cap];
        out[i] = *e;
        memset(e, 0, sizeof(Entry));
    }
    *n = r->len;
    r->len = 0;
    r->head = 0;
    r->bytes = 0;
    return out;
}

/* Drop the references of `n` entries and the array. */
static void
entries_release(Entry *entries, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        entry_clear(&entries[i]);
    }
    PyMem_Free(entries);
}

/* The entries as a list of tuples; the entries are released either way. */
static PyObject *
entries_list(Entry *entries, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list != NULL && i < n; i++) {
        PyObject *t = entry_tuple(&entries[i]);
        if (t == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, t);
    }
    entries_release(entries, n);
    return list;
}

static PyObject *
Ring_take(Ring *r, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t n;
    Entry *taken = ring_detach(r, &n);
    if (taken == NULL) {
        return NULL;
    }
    int64_t start = r->read_seq;
    int64_t end = r->next_seq;
    r->read_seq = end;
    PyObject *list = entries_list(taken, n);
    if (list == NULL) {
        return NULL;
    }
    return Py_BuildValue("(NLL)", list, (long long)start, (long long)end);
}

static PyObject *
Ring_snapshot(Ring *r, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t n;
    Entry *copy = ring_copy(r, &n);
    return copy == NULL ? NULL : entries_list(copy, n);
}

static PyObject *
Ring_pending(Ring *r, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(r->len > 0 || r->next_seq != r->read_seq);
}

static PyObject *
Ring_clear(Ring *r, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t n;
    Entry *gone = ring_detach(r, &n);
    if (gone == NULL) {
        return NULL;
    }
    r->read_seq = r->next_seq;
    r->overrun = r->dropped = 0;
    entries_release(gone, n); /* last: it may run Python code (see ring_copy) */
    Py_RETURN_NONE;
}

static PyObject *
Ring_add_lost(Ring *r, PyObject *arg)
{
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (n > 0) {
        r->next_seq += n;
        r->dropped += n;
        ring_wake(r);
    }
    Py_RETURN_NONE;
}

static PyObject *
Ring_resize(Ring *r, PyObject *arg)
{
    Py_ssize_t lim;
    if (check_limit(arg, &lim) < 0) {
        return NULL;
    }
    r->limit = lim;
    while (r->bytes > lim && r->len) {
        ring_pop(r);
        r->overrun++;
    }
    Py_RETURN_NONE;
}

static PyObject *
Ring_counts(Ring *r, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(nL)", r->len, (long long)(r->len + r->overrun));
}

static PyMethodDef Ring_methods[] = {
    {"append", (PyCFunction)(void (*)(void))Ring_append, METH_FASTCALL,
     "append(ts, key, event, values, caller, size) -> bool"},
    {"take", (PyCFunction)Ring_take, METH_NOARGS, "take() -> (entries, start, end)"},
    {"snapshot", (PyCFunction)Ring_snapshot, METH_NOARGS, "snapshot() -> entries"},
    {"pending", (PyCFunction)Ring_pending, METH_NOARGS, "pending() -> bool"},
    {"clear", (PyCFunction)Ring_clear, METH_NOARGS, "clear()"},
    {"add_lost", (PyCFunction)Ring_add_lost, METH_O, "add_lost(n)"},
    {"resize", (PyCFunction)Ring_resize, METH_O, "resize(limit)"},
    {"counts", (PyCFunction)Ring_counts, METH_NOARGS, "counts() -> (entries, written)"},
    {NULL},
};

#define FLAG_GETSET(name)                                                                \
    static PyObject *Ring_get_##name(Ring *r, void *c) { return PyBool_FromLong(r->name); } \
    static int Ring_set_##name(Ring *r, PyObject *v, void *c)                            \
    {                                                                                    \
        int b = v == NULL ? 0 : PyObject_IsTrue(v);                                      \
        if (b < 0) {                                                                     \
            return -1;                                                                   \
        }                                                                                \
        r->name = (char)b;                                                               \
        return 0;                                                                        \
    }
FLAG_GETSET(tracing_on)
FLAG_GETSET(overwrite)
FLAG_GETSET(waiting)

static PyObject *
Ring_get_wake(Ring *r, void *c)
{
    return Py_NewRef(r->wake ? r->wake : Py_None);
}

static int
Ring_set_wake(Ring *r, PyObject *v, void *c)
{
    Py_XSETREF(r->wake, Py_XNewRef(v));
    return 0;
}

#define INT_GETTER(name, expr)                                                     \
    static PyObject *Ring_get_##name(Ring *r, void *c) { return PyLong_FromLongLong(expr); }
INT_GETTER(limit, r->limit)
INT_GETTER(entries, r->len)
INT_GETTER(bytes_used, r->bytes)
INT_GETTER(overrun, r->overrun)
INT_GETTER(dropped, r->dropped)
INT_GETTER(next_seq, r->next_seq)
INT_GETTER(read_seq, r->read_seq)

static PyGetSetDef Ring_getset[] = {
    {"tracing_on", (getter)Ring_get_tracing_on, (setter)Ring_set_tracing_on, NULL, NULL},
    {"overwrite", (getter)Ring_get_overwrite, (setter)Ring_set_overwrite, NULL, NULL},
    {"waiting", (getter)Ring_get_waiting, (setter)Ring_set_waiting, NULL, NULL},
    {"wake", (getter)Ring_get_wake, (setter)Ring_set_wake, NULL, NULL},
    {"limit", (getter)Ring_get_limit, NULL, NULL, NULL},
    {"entries", (getter)Ring_get_entries, NULL, NULL, NULL},
    {"bytes_used", (getter)Ring_get_bytes_used, NULL, NULL, NULL},
    {"overrun", (getter)Ring_get_overrun, NULL, NULL, NULL},
    {"dropped", (getter)Ring_get_dropped, NULL, NULL, NULL},
    {"next_seq", (getter)Ring_get_next_seq, NULL, NULL, NULL},
    {"read_seq", (getter)Ring_get_read_seq, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject Ring_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pykprobes.trace._speedups.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The trace buffer's storage (see ring.py).",
    .tp_new = Ring_new,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_traverse = (traverseproc)Ring_traverse,
    .tp_clear = (inquiry)Ring_clear_refs,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

/* ------------------------------------------------------------------ Recorder */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    char fast;
    long long nhit;
    PyObject *event;
    Ring *ring;
    PyObject *busy;       /* core.guard.busy: careful-path hits in flight, by thread */
    PyObject *held;       /* core.guard.held: [the fast-path hit's Regs, or None] */
    PyObject *kinds;      /* tuple of int */
    PyObject *converters; /* tuple of callables */
    unsigned char *kind;  /* the kinds, as bytes */
    Py_ssize_t n;
    Py_ssize_t size;
    char caller;          /* a return record's: the caller text follows the values */
} Recorder;

/* Record `values` (n of them) with `caller` (None: an entry record) at `ts` (0: now), for
 * the thread whose state is `tstate`; 0 recorded, 1 refused (the careful path's). Never
 * raises. */
static int
recorder_put(Recorder *self, PyObject *const *args, Py_ssize_t n, PyObject *caller, int64_t ts,
             PyThreadState *tstate)
{
    Ring *ring = self->ring;
    if (!self->fast || !ring->tracing_on || PyDict_GET_SIZE(self->busy)
        || PyList_GET_ITEM(self->held, 0) != Py_None || n != self->n) {
        return 1;
    }
    PyObject *values = PyTuple_New(n);
    if (values == NULL) {
        PyErr_Clear();
        return 1;
    }
    Py_ssize_t size = OVERHEAD + SCALAR * n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = args[i];
        PyTypeObject *tp = Py_TYPE(v);
        int keep;
        switch (self->kind[i]) {
        case KIND_DESCRIBE:
            keep = tp == &PyLong_Type || tp == &PyFloat_Type || tp == &PyBool_Type
                   || v == Py_None
                   || (tp == &PyUnicode_Type && PyUnicode_GET_LENGTH(v) <= STR_CAP)
                   || (tp == &PyBytes_Type && PyBytes_GET_SIZE(v) <= STR_CAP);
            break;
        case KIND_INT:
            keep = tp == &PyLong_Type;
            break;
        case KIND_FLOAT:
            keep = tp == &PyFloat_Type;
            break;
        case KIND_STR:
            keep = tp == &PyUnicode_Type && PyUnicode_GET_LENGTH(v) <= STR_CAP;
            break;
        default:
            keep = 0;
        }
        if (keep) {
            Py_INCREF(v);
        }
        else {
            v = PyObject_CallOneArg(PyTuple_GET_ITEM(self->converters, i), v);
            if (v == NULL) { /* converters never raise; if one did, the careful path */
                PyErr_Clear();
                Py_DECREF(values);
                return 1;
            }
            tp = Py_TYPE(v);
        }
        if (tp == &PyUnicode_Type) {
            size += DATA_LOC - SCALAR + PyUnicode_GET_LENGTH(v);
        }
        else if (tp == &PyBytes_Type) {
            size += DATA_LOC - SCALAR + PyBytes_GET_SIZE(v);
        }
        PyTuple_SET_ITEM(values, i, v);
    }
    if (caller != Py_None) {
        size += RETURN_EXTRA;
    }
    if (self->size >= 0) {
        size = self->size;
    }
    PyObject *key = current_key(tstate);
    if (key == NULL) {
        Py_DECREF(values);
        return 1;
    }
    ring_put(ring, ts ? ts : monotonic_ns(), key, self->event, values, caller, size);
    Py_DECREF(values);
    self->nhit++;
    return 0;
}

static PyObject *
Recorder_call(Recorder *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    PyObject *caller = Py_None;
    int64_t ts = 0;
    if (kwnames != NULL) {
        Py_RETURN_TRUE;
    }
    if (self->caller) {
        /* A return record's: its caller and time follow the values. */
        if (n != self->n + 2) {
            Py_RETURN_TRUE;
        }
        caller = args[n - 2];
        ts = PyLong_CheckExact(args[n - 1]) ? PyLong_AsLongLong(args[n - 1]) : -1;
        if ((caller != Py_None && !PyUnicode_CheckExact(caller)) || ts <= 0) {
            PyErr_Clear();
            Py_RETURN_TRUE;
        }
        n -= 2;
    }
    return PyBool_FromLong(recorder_put(self, args, n, caller, ts, PyThreadState_Get()));
}

/* The return record of core/_rethook.c (its `record_return` capsule): rec(*values, caller,
 * ts) without the int object of `ts` or a call, from the thread whose state is `tstate`
 * (the caller has it: no second look-up). 0: recorded, 1: refused, as rec's result False /
 * True. */
static int
record_return(PyObject *rec, PyObject *const *values, Py_ssize_t n, PyObject *caller,
              int64_t ts, PyThreadState *tstate)
{
    Recorder *self = (Recorder *)rec;
    if (!self->caller || (caller != Py_None && !PyUnicode_CheckExact(caller)) || ts <= 0) {
        return 1;
    }
    return recorder_put(self, values, n, caller, ts, tstate);
}

static PyObject *
Recorder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"event", "ring", "busy", "held", "kinds", "converters", "size",
                             "caller", NULL};
    PyObject *event, *ring, *busy, *held, *kinds, *converters;
    Py_ssize_t size;
    int caller = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO!O!n|p:Recorder", kwlist, &event, &ring,
                                     &busy, &held, &PyTuple_Type, &kinds, &PyTuple_Type,
                                     &converters, &size, &caller)) {
        return NULL;
    }
    if (!PyObject_TypeCheck(ring, &Ring_Type)) {
        PyErr_SetString(PyExc_TypeError, "ring must be a _speedups.Ring");
        return NULL;
    }
    if (!PyDict_CheckExact(busy)) {
        PyErr_SetString(PyExc_TypeError, "busy must be a dict");
        return NULL;
    }
    /* Never resized by its owner (core/site.py): item 0 is read without a check. */
    if (!PyList_CheckExact(held) || PyList_GET_SIZE(held) != 1) {
        PyErr_SetString(PyExc_TypeError, "held must be a list of one item");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(kinds);
    if (PyTuple_GET_SIZE(converters) != n) {
        PyErr_SetString(PyExc_ValueError, "one kind per converter");
        return NULL;
    }
    unsigned char *kind = PyMem_Malloc(n ? (size_t)n : 1);
    if (kind == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *k = PyTuple_GET_ITEM(kinds, i);
        long v = PyLong_CheckExact(k) ? PyLong_AsLong(k) : -1;
        if (v < KIND_CONVERT || v > KIND_STR) {
            PyErr_Clear();
            PyMem_Free(kind);
            PyErr_Format(PyExc_ValueError, "unknown kind %R", k);
            return NULL;
        }
        if (!PyCallable_Check(PyTuple_GET_ITEM(converters, i))) {
            PyMem_Free(kind);
            PyErr_SetString(PyExc_TypeError, "converters must be callable");
            return NULL;
        }
        kind[i] = (unsigned char)v;
    }
    Recorder *self = (Recorder *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyMem_Free(kind);
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)Recorder_call;
    self->event = Py_NewRef(event);
    self->ring = (Ring *)Py_NewRef(ring);
    self->busy = Py_NewRef(busy);
    self->held = Py_NewRef(held);
    self->kinds = Py_NewRef(kinds);
    self->converters = Py_NewRef(converters);
    self->kind = kind;
    self->n = n;
    self->size = size;
    self->caller = (char)caller;
    return (PyObject *)self;
}

static int
Recorder_traverse(Recorder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->event);
    Py_VISIT(self->ring);
    Py_VISIT(self->busy);
    Py_VISIT(self->held);
    Py_VISIT(self->kinds);
    Py_VISIT(self->converters);
    return 0;
}

static int
Recorder_clear_refs(Recorder *self)
{
    Py_CLEAR(self->event);
    Py_CLEAR(self->ring);
    Py_CLEAR(self->busy);
    Py_CLEAR(self->held);
    Py_CLEAR(self->kinds);
    Py_CLEAR(self->converters);
    self->n = 0; /* a cleared recorder hands every hit to the careful path */
    self->fast = 0;
    return 0;
}

static void
Recorder_dealloc(Recorder *self)
{
    PyObject_GC_UnTrack(self);
    Recorder_clear_refs(self);
    PyMem_Free(self->kind);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Recorder_get_fast(Recorder *self, void *c)
{
    return PyBool_FromLong(self->fast);
}

static int
Recorder_set_fast(Recorder *self, PyObject *v, void *c)
{
    int b = v == NULL ? 0 : PyObject_IsTrue(v);
    if (b < 0) {
        return -1;
    }
    /* A cleared recorder (no ring) must never record. */
    self->fast = (char)(b && self->ring != NULL);
    return 0;
}

static PyObject *
Recorder_get_nhit(Recorder *self, void *c)
{
    return PyLong_FromLongLong(self->nhit);
}

static int
Recorder_set_nhit(Recorder *self, PyObject *v, void *c)
{
    long long n = v == NULL ? 0 : PyLong_AsLongLong(v);
    if (n == -1 && PyErr_Occurred()) {
        return -1;
    }
    self->nhit = n;
    return 0;
}

static PyObject *
Recorder_repr(Recorder *self)
{
    return PyUnicode_FromFormat("<Recorder %R fast=%s nhit=%lld>",
                                self->event ? self->event : Py_None,
                                self->fast ? "True" : "False", self->nhit);
}

/* The name core/_rethook.c looks for: a capsule of `record_return`'s type. */
#define RECORD_RETURN_CAPSULE "pykprobes.record_return"

/* A return record's recorder offers `record_return` to the rethook; any other, None. */
static PyObject *
Recorder_get_record_return(Recorder *self, void *c)
{
    if (!self->caller) {
        Py_RETURN_NONE;
    }
    return PyCapsule_New((void *)record_return, RECORD_RETURN_CAPSULE, NULL);
}

static PyGetSetDef Recorder_getset[] = {
    {"record_return", (getter)Recorder_get_record_return, NULL, NULL, NULL},
    {"fast", (getter)Recorder_get_fast, (setter)Recorder_set_fast, NULL, NULL},
    {"nhit", (getter)Recorder_get_nhit, (setter)Recorder_set_nhit, NULL, NULL},
    {NULL},
};

static PyMemberDef Recorder_members[] = {
    {"event", T_OBJECT, offsetof(Recorder, event), READONLY, NULL},
    {"ring", T_OBJECT, offsetof(Recorder, ring), READONLY, NULL},
    {"busy", T_OBJECT, offsetof(Recorder, busy), READONLY, NULL},
    {"held", T_OBJECT, offsetof(Recorder, held), READONLY, NULL},
    {"kinds", T_OBJECT, offsetof(Recorder, kinds), READONLY, NULL},
    {"converters", T_OBJECT, offsetof(Recorder, converters), READONLY, NULL},
    {"size", T_PYSSIZET, offsetof(Recorder, size), READONLY, NULL},
    {NULL},
};

static PyTypeObject Recorder_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pykprobes.trace._speedups.Recorder",
    .tp_basicsize = sizeof(Recorder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "rec(*values) -> bool: the compiled record of an event (see recorder.py).",
    .tp_new = Recorder_new,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_traverse = (traverseproc)Recorder_traverse,
    .tp_clear = (inquiry)Recorder_clear_refs,
    .tp_vectorcall_offset = offsetof(Recorder, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getset = Recorder_getset,
    .tp_members = Recorder_members,
    .tp_repr = (reprfunc)Recorder_repr,
};

/* ------------------------------------------------------------------ Untraced */

/* Untraced(fn): a callable that calls fn(*args) with the calling thread's tracing flag
 * lowered, for the hits of a breakpoint mechanism (core/codestate.py wraps what it arms).
 *
 * CPython runs a sys.monitoring callback (3.12+, Python/instrumentation.c
 * call_one_instrument) and a sys.settrace function (3.11, Python/ceval.c call_trace) with
 * tstate->tracing raised, and reports no event while it is: a probe hit by a handler that
 * such a callback runs would never be seen, where the kernel counts it in nmissed (and the
 * rewritten code, which calls no callback, does too). PyThreadState_LeaveTracing and
 * PyThreadState_EnterTracing (public C API since 3.11) lower it around the call and raise it
 * again before CPython's callback machinery lowers it itself. It is lowered only when raised
 * (`tracing` is a field of the public PyThreadState struct in Include/cpython/pystate.h,
 * 3.11-3.15): called from anywhere else, fn runs as it would. */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fn;
} Untraced;

static PyObject *
Untraced_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *fn = ((Untraced *)self)->fn;
    PyThreadState *tstate = PyThreadState_Get();
    if (tstate->tracing <= 0) {
        return PyObject_Vectorcall(fn, args, nargsf, kwnames);
    }
    PyThreadState_LeaveTracing(tstate);
    PyObject *result = PyObject_Vectorcall(fn, args, nargsf, kwnames);
    PyThreadState_EnterTracing(tstate);
    return result;
}

static PyObject *
Untraced_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *fn;
    if (!PyArg_ParseTuple(args, "O:Untraced", &fn)) {
        return NULL;
    }
    if (!PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "Untraced() takes a callable");
        return NULL;
    }
    Untraced *u = PyObject_GC_New(Untraced, type);
    if (u == NULL) {
        return NULL;
    }
    u->vectorcall = Untraced_vectorcall;
    u->fn = Py_NewRef(fn);
    PyObject_GC_Track(u);
    return (PyObject *)u;
}

static int
Untraced_traverse(Untraced *u, visitproc visit, void *arg)
{
    Py_VISIT(u->fn);
    return 0;
}

static int
Untraced_clear_refs(Untraced *u)
{
    Py_CLEAR(u->fn);
    return 0;
}

static void
Untraced_dealloc(Untraced *u)
{
    PyObject_GC_UnTrack(u);
    Untraced_clear_refs(u);
    PyObject_GC_Del(u);
}

static PyObject *
Untraced_get_fn(Untraced *u, void *c)
{
    return Py_NewRef(u->fn != NULL ? u->fn : Py_None);
}

static PyGetSetDef Untraced_getset[] = {
    {"fn", (getter)Untraced_get_fn, NULL, "The wrapped callable.", NULL},
    {NULL},
};

static PyTypeObject Untraced_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pykprobes.trace._speedups.Untraced",
    .tp_basicsize = sizeof(Untraced),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Untraced(fn)(*args): fn(*args) with CPython's tracing flag lowered.",
    .tp_new = Untraced_new,
    .tp_dealloc = (destructor)Untraced_dealloc,
    .tp_traverse = (traverseproc)Untraced_traverse,
    .tp_clear = (inquiry)Untraced_clear_refs,
    .tp_vectorcall_offset = offsetof(Untraced, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getset = Untraced_getset,
};

/* ------------------------------------------------------------------ module */

static PyObject *
set_note(PyObject *mod, PyObject *args)
{
    PyObject *note, *saved;
    if (!PyArg_ParseTuple(args, "OO!:set_note", &note, &PyDict_Type, &saved)) {
        return NULL;
    }
    if (!PyCallable_Check(note)) {
        PyErr_SetString(PyExc_TypeError, "note must be callable");
        return NULL;
    }
    Py_XSETREF(note_fn, Py_NewRef(note));
    Py_XSETREF(saved_dict, Py_NewRef(saved));
    Py_CLEAR(last_key); /* look again, in the new table */
    last_id = 0;
    Py_RETURN_NONE;
}

static PyObject *
thread_key(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    PyObject *key = current_key(PyThreadState_Get());
    if (key == NULL) {
        return PyErr_NoMemory();
    }
    return Py_NewRef(key);
}

static PyMethodDef module_methods[] = {
    {"set_note", set_note, METH_VARARGS, "set_note(note, saved): cmdlines' table"},
    {"thread_key", thread_key, METH_NOARGS, "The calling thread's key (cmdlines.py)."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pykprobes.trace._speedups",
    .m_doc = "The C accelerator of the trace hot path (see backend.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&Ring_Type) < 0 || PyType_Ready(&Recorder_Type) < 0
        || PyType_Ready(&Untraced_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Ring", (PyObject *)&Ring_Type) < 0
        || PyModule_AddObjectRef(m, "Recorder", (PyObject *)&Recorder_Type) < 0
        || PyModule_AddObjectRef(m, "Untraced", (PyObject *)&Untraced_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
