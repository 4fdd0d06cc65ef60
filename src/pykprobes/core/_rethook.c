/* The C twin of core/rethook.py: the kretprobe fast path of rewritten code (the kernel's
 * rethook). rethook.py's docstrings are the specification; tests/core run both (dev.py
 * runs the suite once more with PYKPROBES_ACCELERATOR=off).
 *
 * Where the Python twin keys a call's node by its frame object, this one keys it by the
 * frame's interpreter frame (`_PyInterpreterFrame *`, which the thread state names in a
 * field of the public struct: `cframe->current_frame` on 3.11/3.12, `current_frame` from
 * 3.13), so that no frame object is made for a call unless a handler reads `regs.frame` or
 * `ri.frame` (`hit_frame`). Finding that frame object then walks the thread's frames and
 * compares each one's `f_frame`, the second field of PyFrameObject after its `f_back` on
 * 3.11 to 3.15 (Include/internal/pycore_frame.h `struct _frame`): `frames_ok()` checks it
 * on the running interpreter before anything relies on it (rethook.py takes the Python twin
 * otherwise).
 *
 * Instances (core/returns.py KretprobeInstance) and Regs are the Python classes: their
 * slots are written directly, at the offsets their member descriptors give.
 *
 * Every call runs with the GIL held; the only Python code run is the handlers', the
 * careful return's and the fault report's, after which every pointer into a thread's
 * stack of nodes is taken again (a handler's own calls push and pop nodes). Never built on
 * a free-threaded interpreter (accelerator.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <time.h>

#if PY_VERSION_HEX < 0x030C0000
/* 3.12's single-object error API, for 3.11. */
static PyObject *
PyErr_GetRaisedException(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) {
        return NULL;
    }
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

static void
PyErr_SetRaisedException(PyObject *exc)
{
    if (exc == NULL) {
        PyErr_Clear();
        return;
    }
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
}
#endif

#define RETVAL (-1)
#define DURATION (-2)
#define INLINE_SLOTS 2

static int64_t
monotonic_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t); /* time.monotonic_ns() on Linux */
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The clock of a latency histogram's `$duration` (a plan whose every stamping return is
 * counted by a `count_ns` counter: no record, no timestamp), in "ticks". A record's
 * `$duration` is CLOCK_MONOTONIC at both ends, the end read once as the record's time, so
 * that a Perfetto slice (its start = time - duration) nests inside its caller's exactly.
 *
 * On x86-64 when the kernel itself keeps time with the TSC (clocksource `tsc`: invariant and
 * synchronised across CPUs, or the kernel would have marked it unstable and switched), a
 * tick is a TSC cycle, scaled to nanoseconds by a factor measured against CLOCK_MONOTONIC_RAW
 * -- the kernel's own `local` trace clock (sched_clock) is the TSC scaled the same way. Why:
 * the vDSO's clock_gettime costs ~26 ns on this kind of VM against ~10 ns for RDTSC, and a
 * latency histogram's hit reads the clock twice (issue 14's 4x goal). Elsewhere a tick is a
 * nanosecond of CLOCK_MONOTONIC. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <x86intrin.h>
#define HAVE_TSC 1
#endif

static int use_tsc;        /* decided once, by stamp_setup() */
static int stamp_ready;
static uint64_t tsc_mult;  /* ns = ticks * tsc_mult >> 32 */
static uint64_t tsc_base;  /* the calibration's start: the module's import */
static int64_t raw_base;

static int64_t
raw_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC_RAW, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline int64_t
stamp_now(void)
{
#ifdef HAVE_TSC
    if (use_tsc) {
        return (int64_t)__rdtsc();
    }
#endif
    return monotonic_ns();
}

/* Nanoseconds in `ticks` (a difference of two stamps; never negative on a clocksource the
 * kernel keeps, but a skew would make a huge unsigned product: 0 then). */
static inline int64_t
stamp_ns(int64_t ticks)
{
    if (ticks < 0) {
        return 0;
    }
#ifdef HAVE_TSC
    if (use_tsc) {
        return (int64_t)(((unsigned __int128)(uint64_t)ticks * tsc_mult) >> 32);
    }
#endif
    return ticks;
}

/* CLOCK_MONOTONIC at the stamp `then` (for a Python instance's entry time). */
static int64_t
stamp_to_monotonic(int64_t then)
{
    int64_t now = stamp_now();
    return monotonic_ns() - stamp_ns(now - then);
}

static int
clocksource_is_tsc(void)
{
    FILE *f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "r");
    if (f == NULL) {
        return 0;
    }
    char name[16] = {0};
    int ok = fgets(name, sizeof name, f) != NULL && strncmp(name, "tsc\n", 4) == 0;
    fclose(f);
    return ok;
}

/* Choose the clock before the first stamp (when a compiled return that stamps is made, not
 * at a hit): the TSC's rate is measured over at least 2 ms since the module's import, so a
 * registration made at once waits out the rest (once per process). The error of the rate is
 * the two clock reads' jitter over the window: some 1e-5. */
static void
stamp_setup(void)
{
    if (stamp_ready) {
        return;
    }
    stamp_ready = 1;
#ifdef HAVE_TSC
    if (!clocksource_is_tsc()) {
        return;
    }
    uint64_t tsc;
    int64_t raw;
    do {
        tsc = __rdtsc();
        raw = raw_ns();
    } while (raw - raw_base < 2000000);
    if (tsc <= tsc_base) {
        return;
    }
    tsc_mult = (uint64_t)((((unsigned __int128)(raw - raw_base)) << 32) / (tsc - tsc_base));
    use_tsc = tsc_mult != 0;
#endif
}

/* The running frame's interpreter frame: the probed frame, when rewritten code calls us. */
static inline void *
frame_key(PyThreadState *ts)
{
#if PY_VERSION_HEX >= 0x030D0000
    return (void *)ts->current_frame;
#else
    return (void *)ts->cframe->current_frame;
#endif
}

/* PyFrameObject's first fields (see the top of the file). */
typedef struct {
    PyObject_HEAD
    PyObject *f_back;
    void *f_frame;
} FrameHead;

/* The frame object of interpreter frame `key` on this thread's stack (made if needed), or
 * NULL (no error set) when it is not there. */
static PyObject *
frame_of_key(void *key)
{
    PyFrameObject *f = PyEval_GetFrame();
    Py_XINCREF(f);
    while (f != NULL) {
        if (((FrameHead *)f)->f_frame == key) {
            return (PyObject *)f;
        }
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    return NULL;
}

/* ------------------------------------------------------------------ thread idents */

static unsigned long last_ident = 0;
static PyObject *last_ident_obj = NULL;

/* threading.get_ident() of this thread (borrowed; what core.site._busy is keyed by), or
 * NULL on a memory error (set). */
static PyObject *
ident_obj(void)
{
    unsigned long ident = PyThread_get_thread_ident();
    if (ident == last_ident && last_ident_obj != NULL) {
        return last_ident_obj;
    }
    PyObject *obj = PyLong_FromUnsignedLong(ident);
    if (obj == NULL) {
        return NULL;
    }
    Py_XSETREF(last_ident_obj, obj);
    last_ident = ident;
    return obj;
}

/* ------------------------------------------------------------------ slots */

static Py_ssize_t
slot_offset(PyTypeObject *type, const char *name)
{
    PyObject *d = PyObject_GetAttrString((PyObject *)type, name);
    if (d == NULL) {
        return -1;
    }
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        Py_DECREF(d);
        PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", type->tp_name, name);
        return -1;
    }
    PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
    Py_ssize_t off = (m->type == T_OBJECT_EX || m->type == T_OBJECT) ? m->offset : -1;
    Py_DECREF(d);
    if (off < 0) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not an object slot", type->tp_name, name);
    }
    return off;
}

static inline PyObject **
slot(PyObject *obj, Py_ssize_t off)
{
    return (PyObject **)((char *)obj + off);
}

/* obj.<slot> = value (a new reference is taken; NULL empties the slot). */
static inline void
slot_set(PyObject *obj, Py_ssize_t off, PyObject *value)
{
    PyObject **p = slot(obj, off);
    PyObject *old = *p;
    *p = Py_XNewRef(value);
    Py_XDECREF(old);
}

/* obj.<slot> += 1 for an int slot (a Kprobe's nhit). */
static void
slot_increment(PyObject *obj, Py_ssize_t off)
{
    PyObject **p = slot(obj, off);
    PyObject *old = *p;
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
        new = PyLong_FromLong(1);
    }
    if (new == NULL) {
        PyErr_Clear(); /* a count lost to a memory error; the hit goes on */
        return;
    }
    *p = new;
    Py_XDECREF(old);
}

/* ------------------------------------------------------------------ the C hit in flight */

/* At most one hit of this module runs handlers at a time in the process: it marks its
 * thread in `busy`, and every other hit then takes the careful path. `hit_frame` serves
 * its Regs and instance. */
static void *cur_key = NULL;
static PyObject *cur_regs = NULL; /* borrowed */
static PyObject *cur_ri = NULL;   /* borrowed */

/* ------------------------------------------------------------------ CompiledReturn */

typedef struct {
    PyObject_HEAD
    PyObject *record;
    PyObject *data;
    PyObject *indices;  /* tuple of int */
    PyObject *sources;  /* tuple of int */
    PyObject *convert;  /* None: the int as it is */
    PyObject *fault;
    char caller;
    char stamp;
    char on; /* 0: the kretprobe's entry goes the plain way (its entry handler runs) */
    Py_ssize_t nindices, nsources;
    Py_ssize_t *index;  /* the indices */
    Py_ssize_t *source; /* the sources */
    /* The last caller seen, by its code object and module name: its text. */
    PyObject *caller_code, *caller_name, *caller_text;
    /* When the one field is $duration and `record` offers it (a latency histogram's
     * counter: trace/_histcount.c): record's count of a duration, with no int object and
     * no call. 0: counted; else refused, as `record` returning True. */
    int (*count_ns)(PyObject *record, int64_t ns);
    /* When `record` is a return record's recorder that offers it (trace/_speedups.c):
     * record(*fields, caller, ts) with no int object for `ts` and no call. 0: recorded;
     * else refused, as `record` returning True. */
    int (*record_return)(PyObject *record, PyObject *const *fields, Py_ssize_t n,
                         PyObject *caller, int64_t ts, PyThreadState *tstate);
} CompiledReturn;

#define COUNT_NS_CAPSULE "pykprobes.count_ns"

#define RECORD_RETURN_CAPSULE "pykprobes.record_return"

/* The C function that `record` offers as its attribute `name`, a capsule of that name
 * (NULL: none). */
static void *
offered(PyObject *record, const char *name, const char *capsule_name)
{
    PyObject *capsule = PyObject_GetAttrString(record, name);
    if (capsule == NULL) {
        PyErr_Clear(); /* not offered: the record is called */
        return NULL;
    }
    void *fn = PyCapsule_IsValid(capsule, capsule_name)
        ? PyCapsule_GetPointer(capsule, capsule_name) : NULL;
    Py_DECREF(capsule);
    return fn;
}

static PyTypeObject CompiledReturn_Type;

static Py_ssize_t *
int_array(PyObject *tuple, Py_ssize_t *n, Py_ssize_t low)
{
    if (!PyTuple_Check(tuple)) {
        PyErr_SetString(PyExc_TypeError, "expected a tuple of int");
        return NULL;
    }
    *n = PyTuple_GET_SIZE(tuple);
    Py_ssize_t *out = PyMem_Malloc((size_t)(*n ? *n : 1) * sizeof(Py_ssize_t));
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        Py_ssize_t v = PyLong_AsSsize_t(PyTuple_GET_ITEM(tuple, i));
        if (v == -1 && PyErr_Occurred()) {
            PyMem_Free(out);
            return NULL;
        }
        if (v < low) {
            PyMem_Free(out);
            PyErr_Format(PyExc_ValueError, "%zd is out of range", v);
            return NULL;
        }
        out[i] = v;
    }
    return out;
}

static PyObject *
CompiledReturn_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"record", "data", "indices", "sources", "convert", "caller",
                             "fault", NULL};
    PyObject *record, *data, *indices, *sources, *convert, *fault;
    int caller;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!O!OpO:CompiledReturn", kwlist, &record,
                                     &data, &PyTuple_Type, &indices, &PyTuple_Type,
                                     &sources, &convert, &caller, &fault)) {
        return NULL;
    }
    if (!PyCallable_Check(record) || !PyCallable_Check(data)
        || (convert != Py_None && !PyCallable_Check(convert))) {
        PyErr_SetString(PyExc_TypeError, "record, data and convert must be callable");
        return NULL;
    }
    Py_ssize_t ni, ns;
    Py_ssize_t *index = int_array(indices, &ni, 0);
    if (index == NULL) {
        return NULL;
    }
    Py_ssize_t *source = int_array(sources, &ns, DURATION);
    if (source == NULL) {
        PyMem_Free(index);
        return NULL;
    }
    char stamp = 0;
    for (Py_ssize_t i = 0; i < ns; i++) {
        if (source[i] >= ni) {
            PyMem_Free(index);
            PyMem_Free(source);
            PyErr_SetString(PyExc_ValueError, "a source beyond the kept values");
            return NULL;
        }
        stamp |= source[i] == DURATION;
    }
    CompiledReturn *self = (CompiledReturn *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyMem_Free(index);
        PyMem_Free(source);
        return NULL;
    }
    self->record = Py_NewRef(record);
    self->data = Py_NewRef(data);
    self->on = 1;
    self->indices = Py_NewRef(indices);
    self->sources = Py_NewRef(sources);
    self->convert = Py_NewRef(convert);
    self->fault = Py_NewRef(fault);
    self->caller = (char)caller;
    self->stamp = stamp;
    if (ns == 1 && source[0] == DURATION && convert == Py_None && !caller) {
        self->count_ns = (int (*)(PyObject *, int64_t))offered(record, "count_ns",
                                                                 COUNT_NS_CAPSULE);
    }
    if (stamp && self->count_ns != NULL) {
        stamp_setup();
    }
    if (caller) {
        self->record_return = (int (*)(PyObject *, PyObject *const *, Py_ssize_t, PyObject *,
                                       int64_t, PyThreadState *))offered(
            record, "record_return", RECORD_RETURN_CAPSULE);
    }
    self->nindices = ni;
    self->nsources = ns;
    self->index = index;
    self->source = source;
    return (PyObject *)self;
}

static int
CompiledReturn_traverse(CompiledReturn *self, visitproc visit, void *arg)
{
    Py_VISIT(self->record);
    Py_VISIT(self->data);
    Py_VISIT(self->convert);
    Py_VISIT(self->fault);
    Py_VISIT(self->caller_code);
    return 0;
}

static int
CompiledReturn_clear(CompiledReturn *self)
{
    Py_CLEAR(self->record);
    Py_CLEAR(self->data);
    Py_CLEAR(self->indices);
    Py_CLEAR(self->sources);
    Py_CLEAR(self->convert);
    Py_CLEAR(self->fault);
    Py_CLEAR(self->caller_code);
    Py_CLEAR(self->caller_name);
    Py_CLEAR(self->caller_text);
    return 0;
}

static void
CompiledReturn_dealloc(CompiledReturn *self)
{
    PyObject_GC_UnTrack(self);
    CompiledReturn_clear(self);
    PyMem_Free(self->index);
    PyMem_Free(self->source);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef CompiledReturn_members[] = {
    {"record", T_OBJECT, offsetof(CompiledReturn, record), READONLY, NULL},
    {"data", T_OBJECT, offsetof(CompiledReturn, data), READONLY, NULL},
    {"on", T_BOOL, offsetof(CompiledReturn, on), 0, NULL},
    {"indices", T_OBJECT, offsetof(CompiledReturn, indices), READONLY, NULL},
    {"sources", T_OBJECT, offsetof(CompiledReturn, sources), READONLY, NULL},
    {"convert", T_OBJECT, offsetof(CompiledReturn, convert), READONLY, NULL},
    {"fault", T_OBJECT, offsetof(CompiledReturn, fault), READONLY, NULL},
    {"caller", T_BOOL, offsetof(CompiledReturn, caller), READONLY, NULL},
    {"stamp", T_BOOL, offsetof(CompiledReturn, stamp), READONLY, NULL},
    {NULL},
};

static PyTypeObject CompiledReturn_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pykprobes.core._rethook.CompiledReturn",
    .tp_basicsize = sizeof(CompiledReturn),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A compiled return event's part of the fast path (see rethook.py).",
    .tp_new = CompiledReturn_new,
    .tp_dealloc = (destructor)CompiledReturn_dealloc,
    .tp_traverse = (traverseproc)CompiledReturn_traverse,
    .tp_clear = (inquiry)CompiledReturn_clear,
    .tp_members = CompiledReturn_members,
};

/* The head of an interpreter frame (`_PyInterpreterFrame`, Include/internal/pycore_frame.h
 * on 3.11-3.13, pycore_interpframe_structs.h from 3.14), as far as `caller_text` reads it:
 * the code, the globals, the link to the frame below and the owner. Why: the caller's name
 * read through PyEval_GetFrame/PyFrame_GetBack makes two frame objects per return (malloc,
 * GC, free: ~15% of a return event's hit on 3.12). `caller_layout` says whether this head
 * matched the frame objects' answer every time it was compared (each new caller is); once
 * it did not, the frame objects alone are used. */
typedef struct {
#if PY_VERSION_HEX >= 0x030C0000
    uintptr_t code; /* 3.14+: a _PyStackRef, its low bits a tag; 3.13: f_executable */
    void *previous;
    PyObject *funcobj;
    PyObject *globals;
    PyObject *builtins;
    PyObject *locals;
    PyObject *frame_obj;
    void *instr;
#if PY_VERSION_HEX >= 0x030E0000
    void *stackpointer;
#else
    int stacktop;
#endif
    uint16_t return_offset;
    char owner;
#else
    PyObject *func;
    PyObject *globals;
    PyObject *builtins;
    PyObject *locals;
    uintptr_t code;
    PyObject *frame_obj;
    void *previous;
    void *prev_instr;
    int stacktop;
    char is_entry;
    char owner;
#endif
} IFrameHead;

/* FRAME_OWNED_BY_THREAD and _BY_GENERATOR (0 and 1 on 3.11-3.15): a frame that runs; the
 * others (a frame object's copy, 3.12+'s shim frames on the C stack) are left to the frame
 * objects. */
#define OWNER_RUNS 1
#define TAG_BITS ((uintptr_t)7)

static char caller_layout = 1; /* 0: the head disagreed once with the frame objects */

/* The code and globals of the frame below the running one (borrowed), by the head; 0 when
 * the head cannot say (the frame objects then do). */
static int
caller_by_head(PyThreadState *ts, PyObject **code, PyObject **globals)
{
    IFrameHead *f = (IFrameHead *)frame_key(ts);
    IFrameHead *back = f != NULL ? (IFrameHead *)f->previous : NULL;
    if (back == NULL || back->owner < 0 || back->owner > OWNER_RUNS) {
        return 0;
    }
    PyObject *c = (PyObject *)(back->code & ~TAG_BITS);
    if (c == NULL || !PyCode_Check(c) || back->globals == NULL
        || !PyDict_Check(back->globals)) {
        return 0;
    }
    *code = c;
    *globals = back->globals;
    return 1;
}

static PyObject *
dunder_name(void)
{
    static PyObject *name = NULL; /* interned once, kept for the process */
    if (name == NULL) {
        name = PyUnicode_InternFromString("__name__");
    }
    return name;
}

/* The caller's `module:qualname` (new reference), None without one, NULL on error. */
static PyObject *
caller_text(CompiledReturn *c, PyThreadState *ts)
{
    PyObject *key = dunder_name();
    if (key == NULL) {
        return NULL;
    }
    PyObject *head_code = NULL, *head_globals = NULL;
    if (caller_layout && caller_by_head(ts, &head_code, &head_globals)) {
        PyObject *name = PyDict_GetItemWithError(head_globals, key);
        if (name == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (head_code == c->caller_code && name == c->caller_name && c->caller_text) {
            return Py_NewRef(c->caller_text);
        }
    }
    /* A caller not seen last: by the frame objects, which also check the head's answer. */
    PyFrameObject *frame = PyEval_GetFrame(); /* the probed frame, made if needed */
    if (frame == NULL) {
        Py_RETURN_NONE;
    }
    PyFrameObject *back = PyFrame_GetBack(frame);
    if (back == NULL) {
        Py_RETURN_NONE;
    }
    PyCodeObject *code = PyFrame_GetCode(back);
    PyObject *globals = PyFrame_GetGlobals(back);
    Py_DECREF(back);
    if (head_code != NULL
        && (head_code != (PyObject *)code || head_globals != globals)) {
        caller_layout = 0;
    }
    PyObject *name = PyDict_GetItemWithError(globals, key);
    PyObject *result = NULL;
    if (name == NULL && PyErr_Occurred()) {
        goto done;
    }
    if ((PyObject *)code == c->caller_code && name == c->caller_name && c->caller_text) {
        result = Py_NewRef(c->caller_text);
        goto done;
    }
    PyObject *qualname = PyObject_GetAttrString((PyObject *)code, "co_qualname");
    if (qualname == NULL) {
        goto done;
    }
    if (name == NULL) {
        result = PyUnicode_FromFormat("?:%S", qualname);
    }
    else {
        result = PyUnicode_FromFormat("%S:%S", name, qualname);
    }
    Py_DECREF(qualname);
    if (result != NULL) {
        Py_XSETREF(c->caller_code, Py_NewRef(code));
        Py_XSETREF(c->caller_name, Py_XNewRef(name));
        Py_XSETREF(c->caller_text, Py_NewRef(result));
    }
done:
    Py_DECREF(code);
    Py_DECREF(globals);
    return result;
}

/* ------------------------------------------------------------------ RetProbe */

typedef struct {
    PyObject_HEAD
    PyObject *rp, *kp, *entry_handler, *handler, *table, *compiled;
    /* An instance no one else holds, emptied, kept for the next call (NULL: none). */
    PyObject *spare;
    Py_ssize_t maxactive, inflight;
    long long nhit, nmissed;
    long long entries; /* hits of the kretprobe's entry probe here (its nhit adds them) */
} RetProbe;

static PyTypeObject RetProbe_Type;

static PyObject *
RetProbe_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *rp;
    if (!PyArg_ParseTuple(args, "O:RetProbe", &rp)) {
        return NULL;
    }
    PyObject *table = PyDict_New();
    if (table == NULL) {
        return NULL;
    }
    RetProbe *self = (RetProbe *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(table);
        return NULL;
    }
    self->rp = Py_NewRef(rp);
    self->kp = Py_NewRef(Py_None);
    self->entry_handler = Py_NewRef(Py_None);
    self->handler = Py_NewRef(Py_None);
    self->compiled = Py_NewRef(Py_None);
    self->table = table;
    return (PyObject *)self;
}

static int
RetProbe_traverse(RetProbe *self, visitproc visit, void *arg)
{
    Py_VISIT(self->rp);
    Py_VISIT(self->kp);
    Py_VISIT(self->entry_handler);
    Py_VISIT(self->handler);
    Py_VISIT(self->table);
    Py_VISIT(self->compiled);
    Py_VISIT(self->spare);
    return 0;
}

static int
RetProbe_clear(RetProbe *self)
{
    Py_CLEAR(self->spare);
    Py_CLEAR(self->rp);
    Py_CLEAR(self->kp);
    Py_CLEAR(self->entry_handler);
    Py_CLEAR(self->handler);
    Py_CLEAR(self->table);
    Py_CLEAR(self->compiled);
    return 0;
}

static void
RetProbe_dealloc(RetProbe *self)
{
    PyObject_GC_UnTrack(self);
    RetProbe_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define OBJ_GETSET(field, check)                                                         \
    static PyObject *RetProbe_get_##field(RetProbe *s, void *c)                         \
    {                                                                                    \
        return Py_NewRef(s->field ? s->field : Py_None);                                 \
    }                                                                                    \
    static int RetProbe_set_##field(RetProbe *s, PyObject *v, void *c)                  \
    {                                                                                    \
        if (v == NULL) {                                                                 \
            v = Py_None;                                                                 \
        }                                                                                \
        if (!(check)) {                                                                  \
            PyErr_SetString(PyExc_TypeError, "RetProbe." #field ": wrong type");        \
            return -1;                                                                   \
        }                                                                                \
        Py_XSETREF(s->field, Py_NewRef(v));                                              \
        return 0;                                                                        \
    }
OBJ_GETSET(kp, 1)
OBJ_GETSET(entry_handler, v == Py_None || PyCallable_Check(v))
OBJ_GETSET(handler, v == Py_None || PyCallable_Check(v))
OBJ_GETSET(table, PyDict_Check(v))
OBJ_GETSET(compiled, v == Py_None || PyObject_TypeCheck(v, &CompiledReturn_Type))

#define INT_GETSET(field, ctype, conv, from)                                             \
    static PyObject *RetProbe_get_##field(RetProbe *s, void *c) { return from(s->field); } \
    static int RetProbe_set_##field(RetProbe *s, PyObject *v, void *c)                  \
    {                                                                                    \
        ctype n = v == NULL ? 0 : conv(v);                                               \
        if (n == (ctype)-1 && PyErr_Occurred()) {                                        \
            return -1;                                                                   \
        }                                                                                \
        s->field = n;                                                                    \
        return 0;                                                                        \
    }
INT_GETSET(maxactive, Py_ssize_t, PyLong_AsSsize_t, PyLong_FromSsize_t)
INT_GETSET(inflight, Py_ssize_t, PyLong_AsSsize_t, PyLong_FromSsize_t)
INT_GETSET(nhit, long long, PyLong_AsLongLong, PyLong_FromLongLong)
INT_GETSET(nmissed, long long, PyLong_AsLongLong, PyLong_FromLongLong)
INT_GETSET(entries, long long, PyLong_AsLongLong, PyLong_FromLongLong)

#define GS(name) {#name, (getter)RetProbe_get_##name, (setter)RetProbe_set_##name, NULL, NULL}
static PyGetSetDef RetProbe_getset[] = {
    GS(kp), GS(entry_handler), GS(handler), GS(table), GS(compiled),
    GS(maxactive), GS(inflight), GS(nhit), GS(nmissed), GS(entries),
    {NULL},
};

static PyMemberDef RetProbe_members[] = {
    {"rp", T_OBJECT, offsetof(RetProbe, rp), READONLY, NULL},
    {NULL},
};

static PyTypeObject RetProbe_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pykprobes.core._rethook.RetProbe",
    .tp_basicsize = sizeof(RetProbe),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "What the fast path needs of one kretprobe (see rethook.py).",
    .tp_new = RetProbe_new,
    .tp_dealloc = (destructor)RetProbe_dealloc,
    .tp_traverse = (traverseproc)RetProbe_traverse,
    .tp_clear = (inquiry)RetProbe_clear,
    .tp_getset = RetProbe_getset,
    .tp_members = RetProbe_members,
};

/* ------------------------------------------------------------------ Plan */

/* One probe of the entry site: a kprobe (p, its pre-handler, where its nhit is) or a
 * kretprobe's RetProbe. */
typedef struct {
    PyObject *p;       /* the kprobe, or the RetProbe */
    PyObject *handler; /* the kprobe's pre-handler, or NULL */
    Py_ssize_t nhit;   /* offset of the kprobe's nhit (-1 for a RetProbe) */
    RetProbe *ret;     /* NULL for a kprobe */
} PlanItem;

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;
    Py_ssize_t nvalues; /* -1: any */
    char stamp;
    char tsc; /* every stamping return is a latency histogram's: stamped with the TSC */
    PlanItem items[1];
} Plan;

static void
Plan_dealloc(Plan *self)
{
    for (Py_ssize_t i = 0; i < self->n; i++) {
        Py_XDECREF(self->items[i].p);
        Py_XDECREF(self->items[i].handler);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject Plan_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pykprobes.core._rethook.Plan",
    .tp_basicsize = sizeof(Plan) - sizeof(PlanItem),
    .tp_itemsize = sizeof(PlanItem),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Plan_dealloc,
};

/* ------------------------------------------------------------------ nodes */

typedef struct {
    PyObject *obj;           /* the instance, or the kept value(s); NULL: nothing filed */
    CompiledReturn *compiled; /* a compiled return's, else NULL */
} Slot;

typedef struct {
    void *key;  /* the interpreter frame */
    Plan *plan; /* NULL: careful */
    int64_t stamp; /* the entry's time (0: not stamped): stamp_now() if `tsc`, else ns */
    char tsc;
    Slot inl[INLINE_SLOTS];
    Slot *more; /* when the plan has more items */
} Node;

typedef struct {
    uint64_t tid;
    Node *nodes;
    Py_ssize_t len, cap;
} Stack;

static inline Slot *
node_slots(Node *node)
{
    return node->more ? node->more : node->inl;
}

static void
slot_release(Slot *s)
{
    Py_CLEAR(s->obj);
    Py_CLEAR(s->compiled);
}

static void
node_release(Node *node)
{
    if (node->plan != NULL) {
        Slot *slots = node_slots(node);
        for (Py_ssize_t i = 0; i < node->plan->n; i++) {
            slot_release(&slots[i]);
        }
        PyMem_Free(node->more);
        node->more = NULL;
        Py_CLEAR(node->plan);
    }
}

/* Count the node's filed calls from `start` on as missed, and release them. */
static void
node_miss(Node *node, Py_ssize_t start)
{
    if (node->plan == NULL) {
        return;
    }
    Slot *slots = node_slots(node);
    for (Py_ssize_t i = start; i < node->plan->n; i++) {
        if (slots[i].obj != NULL) {
            RetProbe *r = node->plan->items[i].ret;
            if (r != NULL) {
                r->inflight--;
                r->nmissed++;
            }
            slot_release(&slots[i]);
        }
    }
}

/* ------------------------------------------------------------------ Rethook */

typedef struct {
    PyObject_HEAD
    PyObject *busy, *held, *entry_regs, *return_regs, *careful, *instance, *fault;
    Plan *plan;
    Stack **stacks;
    Py_ssize_t nstacks;
    Stack *last;
    /* Slot offsets: the Regs' _frame, retval, exception; the instance's. */
    Py_ssize_t r_frame, r_retval, r_exception;
    Py_ssize_t i_rp, i_thread, i_retval, i_exception, i_data, i_frame;
} Rethook;

static PyTypeObject Rethook_Type;

static Stack *
stack_for(Rethook *self, uint64_t tid, int create)
{
    if (self->last != NULL && self->last->tid == tid) {
        return self->last;
    }
    for (Py_ssize_t i = 0; i < self->nstacks; i++) {
        if (self->stacks[i]->tid == tid) {
            self->last = self->stacks[i];
            return self->last;
        }
    }
    if (!create) {
        return NULL;
    }
    /* Reuse the stack of a thread with nothing in flight (most are of ended threads). */
    for (Py_ssize_t i = 0; i < self->nstacks; i++) {
        if (self->stacks[i]->len == 0) {
            self->stacks[i]->tid = tid;
            self->last = self->stacks[i];
            return self->last;
        }
    }
    Stack *st = PyMem_Calloc(1, sizeof(Stack));
    if (st == NULL) {
        return NULL;
    }
    Stack **grown = PyMem_Realloc(self->stacks, (size_t)(self->nstacks + 1) * sizeof(Stack *));
    if (grown == NULL) {
        PyMem_Free(st);
        return NULL;
    }
    st->tid = tid;
    self->stacks = grown;
    self->stacks[self->nstacks++] = st;
    self->last = st;
    return st;
}

/* Push a careful node for `key`; its index, or -1 (no memory: nothing pushed). */
static Py_ssize_t
stack_push(Stack *st, void *key)
{
    if (st->len == st->cap) {
        Py_ssize_t cap = st->cap ? st->cap * 2 : 16;
        Node *grown = PyMem_Realloc(st->nodes, (size_t)cap * sizeof(Node));
        if (grown == NULL) {
            return -1;
        }
        st->nodes = grown;
        st->cap = cap;
    }
    Node *node = &st->nodes[st->len];
    memset(node, 0, sizeof(Node));
    node->key = key;
    return st->len++;
}

static PyObject *
Rethook_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *busy, *held, *entry_regs, *return_regs, *careful, *instance, *fault;
    if (!PyArg_ParseTuple(args, "O!O!OOOO!O:Rethook", &PyDict_Type, &busy, &PyList_Type, &held,
                          &entry_regs, &return_regs, &careful, &PyType_Type, &instance,
                          &fault)) {
        return NULL;
    }
    /* Never resized by its owner (core/site.py): item 0 is read without a check. */
    if (PyList_GET_SIZE(held) != 1) {
        PyErr_SetString(PyExc_TypeError, "held must be a list of one item");
        return NULL;
    }
    if (!PyCallable_Check(careful) || !PyCallable_Check(fault)) {
        PyErr_SetString(PyExc_TypeError, "careful and fault must be callable");
        return NULL;
    }
    PyTypeObject *regs_type = Py_TYPE(return_regs);
    PyTypeObject *ri_type = (PyTypeObject *)instance;
    Py_ssize_t offs[9];
    if ((offs[0] = slot_offset(regs_type, "_frame")) < 0
        || (offs[1] = slot_offset(regs_type, "retval")) < 0
        || (offs[2] = slot_offset(regs_type, "exception")) < 0
        || (offs[3] = slot_offset(ri_type, "rp")) < 0
        || (offs[4] = slot_offset(ri_type, "thread")) < 0
        || (offs[5] = slot_offset(ri_type, "retval")) < 0
        || (offs[6] = slot_offset(ri_type, "exception")) < 0
        || (offs[7] = slot_offset(ri_type, "_data")) < 0
        || (offs[8] = slot_offset(ri_type, "_frame")) < 0) {
        return NULL;
    }
    if (Py_TYPE(entry_regs) != regs_type) {
        PyErr_SetString(PyExc_TypeError, "both Regs must be of one type");
        return NULL;
    }
    Rethook *self = (Rethook *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->busy = Py_NewRef(busy);
    self->held = Py_NewRef(held);
    self->entry_regs = Py_NewRef(entry_regs);
    self->return_regs = Py_NewRef(return_regs);
    self->careful = Py_NewRef(careful);
    self->instance = Py_NewRef(instance);
    self->fault = Py_NewRef(fault);
    self->r_frame = offs[0];
    self->r_retval = offs[1];
    self->r_exception = offs[2];
    self->i_rp = offs[3];
    self->i_thread = offs[4];
    self->i_retval = offs[5];
    self->i_exception = offs[6];
    self->i_data = offs[7];
    self->i_frame = offs[8];
    return (PyObject *)self;
}

static int
Rethook_traverse(Rethook *self, visitproc visit, void *arg)
{
    Py_VISIT(self->busy);
    Py_VISIT(self->held);
    Py_VISIT(self->entry_regs);
    Py_VISIT(self->return_regs);
    Py_VISIT(self->careful);
    Py_VISIT(self->instance);
    Py_VISIT(self->fault);
    Py_VISIT(self->plan);
    for (Py_ssize_t i = 0; i < self->nstacks; i++) {
        Stack *st = self->stacks[i];
        for (Py_ssize_t j = 0; j < st->len; j++) {
            Node *node = &st->nodes[j];
            if (node->plan == NULL) {
                continue;
            }
            Py_VISIT(node->plan);
            Slot *slots = node_slots(node);
            for (Py_ssize_t k = 0; k < node->plan->n; k++) {
                Py_VISIT(slots[k].obj);
                Py_VISIT(slots[k].compiled);
            }
        }
    }
    return 0;
}

static void
stacks_clear(Rethook *self)
{
    for (Py_ssize_t i = 0; i < self->nstacks; i++) {
        Stack *st = self->stacks[i];
        while (st->len) {
            Node node = st->nodes[--st->len];
            node_release(&node);
        }
    }
}

static int
Rethook_clear(Rethook *self)
{
    stacks_clear(self);
    Py_CLEAR(self->busy);
    Py_CLEAR(self->held);
    Py_CLEAR(self->entry_regs);
    Py_CLEAR(self->return_regs);
    Py_CLEAR(self->careful);
    Py_CLEAR(self->instance);
    Py_CLEAR(self->fault);
    Py_CLEAR(self->plan);
    return 0;
}

static void
Rethook_dealloc(Rethook *self)
{
    PyObject_GC_UnTrack(self);
    Rethook_clear(self);
    for (Py_ssize_t i = 0; i < self->nstacks; i++) {
        PyMem_Free(self->stacks[i]->nodes);
        PyMem_Free(self->stacks[i]);
    }
    PyMem_Free(self->stacks);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* publish(items or None, nparams) */
static PyObject *
Rethook_publish(Rethook *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "publish(items, nparams) takes 2 arguments");
        return NULL;
    }
    PyObject *items = args[0];
    Py_ssize_t nparams = PyLong_AsSsize_t(args[1]);
    if (nparams == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (items == Py_None) {
        Py_CLEAR(self->plan);
        Py_RETURN_NONE;
    }
    if (!PyTuple_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "items must be a tuple or None");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(items);
    Plan *plan = PyObject_NewVar(Plan, &Plan_Type, n ? n : 1);
    if (plan == NULL) {
        return NULL;
    }
    plan->n = 0;
    plan->nvalues = -1;
    plan->stamp = 0;
    plan->tsc = 1;
    char compiled = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyTuple_GET_ITEM(items, i);
        PlanItem *pi = &plan->items[i];
        PyObject *probe;
        if (PyObject_TypeCheck(it, &RetProbe_Type)) {
            RetProbe *r = (RetProbe *)it;
            pi->ret = r;
            pi->p = Py_NewRef(it);
            pi->handler = NULL;
            probe = r->kp;
            if (r->compiled != Py_None) {
                compiled = 1;
                CompiledReturn *c = (CompiledReturn *)r->compiled;
                plan->stamp |= c->stamp;
                if (c->stamp && c->count_ns == NULL) {
                    plan->tsc = 0; /* a record's duration: see stamp_now() */
                }
            }
        }
        else if (PyTuple_Check(it) && PyTuple_GET_SIZE(it) == 2) {
            probe = PyTuple_GET_ITEM(it, 0);
            PyObject *handler = PyTuple_GET_ITEM(it, 1);
            pi->ret = NULL;
            pi->p = Py_NewRef(probe);
            pi->handler = handler == Py_None ? NULL : Py_NewRef(handler);
        }
        else {
            Py_DECREF(plan);
            PyErr_SetString(PyExc_TypeError, "an item is a RetProbe or a (kprobe, handler)");
            return NULL;
        }
        plan->n = i + 1;
        if (pi->ret != NULL) {
            pi->nhit = -1; /* the RetProbe counts its entry probe's hits (`entries`) */
            continue;
        }
        pi->nhit = slot_offset(Py_TYPE(probe), "nhit");
        if (pi->nhit < 0) {
            Py_DECREF(plan);
            return NULL;
        }
    }
    plan->nvalues = compiled ? nparams : -1;
    Py_XSETREF(self->plan, plan);
    Py_RETURN_NONE;
}

static PyObject *
Rethook_set_entry_regs(Rethook *self, PyObject *regs)
{
    if (Py_TYPE(regs) != Py_TYPE(self->return_regs)) {
        PyErr_SetString(PyExc_TypeError, "both Regs must be of one type");
        return NULL;
    }
    Py_XSETREF(self->entry_regs, Py_NewRef(regs));
    Py_RETURN_NONE;
}

/* Mark this thread as running a handler of the C hit of `key` with `regs` (once per hit). */
static int
mark(Rethook *self, int *marked, PyObject *tid, PyObject *regs, void *key)
{
    if (*marked) {
        return 0;
    }
    if (PyDict_SetItem(self->busy, tid, regs) < 0) {
        return -1;
    }
    *marked = 1;
    cur_key = key;
    cur_regs = regs;
    return 0;
}

static void
unmark(Rethook *self, int marked, PyObject *tid, PyObject *regs)
{
    if (!marked) {
        return;
    }
    PyObject *exc = PyErr_GetRaisedException();
    if (PyDict_DelItem(self->busy, tid) < 0) {
        PyErr_Clear();
    }
    slot_set(regs, self->r_frame, Py_None);
    slot_set(regs, self->r_retval, Py_None);
    slot_set(regs, self->r_exception, Py_None);
    cur_key = NULL;
    cur_regs = NULL;
    cur_ri = NULL;
    PyErr_SetRaisedException(exc);
}

/* After a handler failed (an error is set): -1 if it is a KeyboardInterrupt, to go on into
 * the program; else the fault is reported on `probe` and cleared: 0. */
static int
handler_failed(Rethook *self, PyObject *probe, const char *where)
{
    if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
        return -1;
    }
    PyObject *exc = PyErr_GetRaisedException();
    PyObject *w = PyUnicode_FromString(where);
    if (w != NULL) {
        PyObject *r = PyObject_CallFunctionObjArgs(self->fault, probe, w, exc, NULL);
        Py_XDECREF(r);
        Py_DECREF(w);
    }
    Py_XDECREF(exc);
    if (PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            return -1;
        }
        PyErr_Clear();
    }
    return 0;
}

/* A KretprobeInstance of `r` for this thread (`tid`): the spare one, or a new one; NULL with
 * an error set. */
static PyObject *
new_instance(Rethook *self, RetProbe *r, PyObject *tid)
{
    PyObject *ri = r->spare;
    if (ri != NULL) {
        r->spare = NULL;
    }
    else {
        ri = ((PyTypeObject *)self->instance)->tp_alloc((PyTypeObject *)self->instance, 0);
        if (ri == NULL) {
            return NULL;
        }
    }
    slot_set(ri, self->i_rp, r->rp);
    slot_set(ri, self->i_thread, tid);
    slot_set(ri, self->i_retval, Py_None);
    slot_set(ri, self->i_exception, Py_None);
    return ri;
}

/* Release the instance `ri` (a reference the caller owns) after its return: kept emptied as
 * `r`'s spare when no one else holds it (a handler that kept it keeps it as it was). */
static void
recycle_instance(Rethook *self, RetProbe *r, PyObject *ri)
{
    if (Py_REFCNT(ri) != 1 || r->spare != NULL) {
        Py_DECREF(ri);
        return;
    }
    /* Emptied: what it held (the value returned, its data) is not kept alive by it. */
    slot_set(ri, self->i_retval, NULL);
    slot_set(ri, self->i_exception, NULL);
    slot_set(ri, self->i_data, NULL);
    slot_set(ri, self->i_frame, NULL);
    if (Py_REFCNT(ri) != 1 || r->spare != NULL) { /* what was emptied ran code */
        Py_DECREF(ri);
        return;
    }
    r->spare = ri;
}

static PyObject *
Rethook_entry(Rethook *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyThreadState *ts = PyThreadState_Get();
    void *key = frame_key(ts);
    Stack *st = stack_for(self, PyThreadState_GetID(ts), 1);
    if (st == NULL) {
        Py_RETURN_TRUE; /* no memory for a node: the careful path, whose return finds none */
    }
    Py_ssize_t idx = stack_push(st, key);
    if (idx < 0) {
        Py_RETURN_TRUE;
    }
    Plan *plan = self->plan;
    if (plan == NULL || PyDict_GET_SIZE(self->busy) || PyList_GET_ITEM(self->held, 0) != Py_None
        || (plan->nvalues >= 0 && nargs != plan->nvalues)) {
        Py_RETURN_TRUE;
    }
    Node *node = &st->nodes[idx];
    if (plan->n > INLINE_SLOTS) {
        node->more = PyMem_Calloc((size_t)plan->n, sizeof(Slot));
        if (node->more == NULL) {
            Py_RETURN_TRUE;
        }
    }
    node->plan = (Plan *)Py_NewRef(plan);
    PyObject *tid = NULL;
    PyObject *regs = self->entry_regs;
    Py_INCREF(regs);
    int marked = 0;
    PyObject *result = Py_False;
    for (Py_ssize_t i = 0; i < plan->n; i++) {
        PlanItem *pi = &plan->items[i];
        RetProbe *r = pi->ret;
        if (r == NULL) {
            slot_increment(pi->p, pi->nhit);
            if (pi->handler == NULL) {
                continue;
            }
            if (tid == NULL && (tid = ident_obj()) == NULL) {
                goto fail;
            }
            if (mark(self, &marked, tid, regs, key) < 0) {
                goto fail;
            }
            PyObject *hargs[2] = {pi->p, regs};
            PyObject *res = PyObject_Vectorcall(pi->handler, hargs, 2, NULL);
            if (res == NULL) {
                if (handler_failed(self, pi->p, "pre_handler") < 0) {
                    goto fail;
                }
            }
            Py_XDECREF(res);
            continue;
        }
        r->entries++;
        if (PyDict_GET_SIZE(r->table) + r->inflight >= r->maxactive) {
            r->nmissed++;
            continue;
        }
        if (r->compiled != Py_None && ((CompiledReturn *)r->compiled)->on) {
            CompiledReturn *c = (CompiledReturn *)r->compiled;
            PyObject *kept;
            if (c->nindices == 0) {
                kept = Py_NewRef(Py_None);
            }
            else if (c->nindices == 1) {
                kept = Py_NewRef(args[c->index[0]]);
            }
            else {
                kept = PyTuple_New(c->nindices);
                if (kept == NULL) {
                    PyErr_Clear();
                    r->nmissed++;
                    continue;
                }
                for (Py_ssize_t k = 0; k < c->nindices; k++) {
                    PyTuple_SET_ITEM(kept, k, Py_NewRef(args[c->index[k]]));
                }
            }
            node = &st->nodes[idx];
            Slot *s = &node_slots(node)[i];
            s->obj = kept;
            s->compiled = (CompiledReturn *)Py_NewRef(c);
            r->inflight++;
            continue;
        }
        if (r->entry_handler == Py_None) {
            /* No handler can see the instance before the return: None stands for it, and
             * the return makes it if its handler needs one. */
            node = &st->nodes[idx];
            node_slots(node)[i].obj = Py_NewRef(Py_None);
            r->inflight++;
            continue;
        }
        if (tid == NULL && (tid = ident_obj()) == NULL) {
            goto fail;
        }
        PyObject *ri = new_instance(self, r, tid);
        if (ri == NULL) {
            PyErr_Clear();
            r->nmissed++;
            continue;
        }
        {
            if (mark(self, &marked, tid, regs, key) < 0) {
                Py_DECREF(ri);
                goto fail;
            }
            PyObject *handler = Py_NewRef(r->entry_handler);
            PyObject *hargs[2] = {ri, regs};
            cur_ri = ri;
            PyObject *res = PyObject_Vectorcall(handler, hargs, 2, NULL);
            cur_ri = NULL;
            Py_DECREF(handler);
            int skip = 0;
            if (res == NULL) {
                if (handler_failed(self, r->rp, "entry_handler") < 0) {
                    Py_DECREF(ri);
                    goto fail;
                }
                skip = 1;
            }
            else {
                skip = PyObject_IsTrue(res);
                Py_DECREF(res);
                if (skip < 0) {
                    if (handler_failed(self, r->rp, "entry_handler") < 0) {
                        Py_DECREF(ri);
                        goto fail;
                    }
                    skip = 1;
                }
            }
            if (skip) {
                Py_DECREF(ri);
                continue;
            }
        }
        node = &st->nodes[idx];
        Slot *s = &node_slots(node)[i];
        s->obj = ri;
        r->inflight++;
    }
    unmark(self, marked, tid, regs);
    Py_DECREF(regs);
    if (plan->stamp) {
        /* Last, so that the duration leaves out what the entry cost. */
        st->nodes[idx].tsc = plan->tsc;
        st->nodes[idx].stamp = plan->tsc ? stamp_now() : monotonic_ns();
    }
    return Py_NewRef(result);
fail:
    /* A KeyboardInterrupt (or a memory error) leaves: the node stays, and the frame's unwind
     * runs the returns of what was filed. */
    unmark(self, marked, tid, regs);
    Py_DECREF(regs);
    return NULL;
}

/* The careful return of the running frame (a careful node, or none). */
static PyObject *
careful_return(Rethook *self, PyObject *value, PyObject *exc)
{
    PyFrameObject *frame = PyEval_GetFrame();
    if (frame == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *cargs[3] = {(PyObject *)frame, value, exc};
    PyObject *res = PyObject_Vectorcall(self->careful, cargs, 3, NULL);
    if (res == NULL) {
        if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            return NULL;
        }
        PyErr_Clear(); /* never raises; if it did, not into the program */
    }
    Py_XDECREF(res);
    Py_RETURN_NONE;
}

/* The fields of a compiled return (new references into `out`); 0, or -1 with an error. */
static int
compiled_fields(CompiledReturn *c, PyObject *kept, PyObject *value, PyObject *exc,
                int stamped, int64_t duration, PyObject **out)
{
    for (Py_ssize_t i = 0; i < c->nsources; i++) {
        Py_ssize_t src = c->source[i];
        PyObject *v;
        if (src == RETVAL) {
            v = Py_NewRef(exc != Py_None ? c->fault : value);
        }
        else if (src == DURATION) {
            if (!stamped) {
                v = Py_NewRef(c->fault);
            }
            else {
                PyObject *d = PyLong_FromLongLong(duration);
                if (d == NULL) {
                    v = NULL;
                }
                else if (c->convert == Py_None) {
                    v = d;
                }
                else {
                    v = PyObject_CallOneArg(c->convert, d);
                    Py_DECREF(d);
                }
            }
        }
        else if (c->nindices == 1) {
            v = Py_NewRef(kept);
        }
        else {
            v = Py_NewRef(PyTuple_GET_ITEM(kept, src));
        }
        if (v == NULL) {
            for (Py_ssize_t k = 0; k < i; k++) {
                Py_DECREF(out[k]);
            }
            return -1;
        }
        out[i] = v;
    }
    return 0;
}

/* The kept values as a tuple, for `data` (new reference). */
static PyObject *
kept_tuple(CompiledReturn *c, PyObject *kept)
{
    if (c->nindices == 0) {
        return PyTuple_New(0);
    }
    if (c->nindices == 1) {
        return PyTuple_Pack(1, kept);
    }
    return Py_NewRef(kept);
}

#define MAX_FIELDS 64

/* Turn a compiled return's slot into an instance's (of `r`, for thread `tid`), its `data`
 * what the compiled return's `data(kept, entry_ns)` makes: what the kretprobe's entry
 * handler would have kept. 0, or -1 with an error set (the slot as it was). */
static int
compiled_to_instance(Rethook *self, RetProbe *r, Slot *s, int64_t stamp, char tsc,
                     PyObject *tid)
{
    CompiledReturn *c = s->compiled;
    PyObject *kept = kept_tuple(c, s->obj);
    if (kept == NULL) {
        return -1;
    }
    /* The instance's entry time is CLOCK_MONOTONIC ns, as the Python twin's (0: none). */
    PyObject *when = PyLong_FromLongLong(stamp && tsc ? stamp_to_monotonic(stamp) : stamp);
    if (when == NULL) {
        Py_DECREF(kept);
        return -1;
    }
    PyObject *dargs[2] = {kept, when};
    PyObject *data = PyObject_Vectorcall(c->data, dargs, 2, NULL);
    Py_DECREF(kept);
    Py_DECREF(when);
    if (data == NULL) {
        return -1;
    }
    PyObject *ri = new_instance(self, r, tid);
    if (ri == NULL) {
        Py_DECREF(data);
        return -1;
    }
    slot_set(ri, self->i_data, data);
    Py_DECREF(data);
    Py_SETREF(s->obj, ri);
    Py_CLEAR(s->compiled);
    return 0;
}

/* File the node's instances in their kretprobes' tables under the running frame, for the
 * careful return; a compiled return's call is counted missed (the careful path has none of
 * them). 0, or -1 with an error set (a KeyboardInterrupt: else the calls are missed). */
static int
hand_over(Rethook *self, Node *node)
{
    Slot *slots = node_slots(node);
    PyObject *frame = NULL;
    for (Py_ssize_t i = 0; i < node->plan->n; i++) {
        Slot *s = &slots[i];
        RetProbe *r = node->plan->items[i].ret;
        if (s->obj == NULL || r == NULL) {
            continue;
        }
        r->inflight--;
        if (s->compiled != NULL) {
            PyObject *tid = ident_obj();
            if (tid == NULL || compiled_to_instance(self, r, s, node->stamp, node->tsc, tid) < 0) {
                if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
                    slot_release(s);
                    r->nmissed++;
                    return -1;
                }
                PyErr_Clear();
            }
        }
        if (s->compiled == NULL && s->obj == Py_None) {
            /* Made now (see Rethook_entry). */
            PyObject *tid = ident_obj();
            PyObject *ri = tid == NULL ? NULL : new_instance(self, r, tid);
            if (ri != NULL) {
                Py_SETREF(s->obj, ri);
            }
            else {
                PyErr_Clear(); /* no memory for it: the call is missed */
            }
        }
        if (s->compiled == NULL && s->obj != Py_None) {
            if (frame == NULL) {
                frame = (PyObject *)PyEval_GetFrame(); /* borrowed; made if needed */
            }
            if (frame != NULL && PyDict_SetItem(r->table, frame, s->obj) == 0) {
                slot_release(s);
                continue;
            }
            if (PyErr_Occurred()) {
                if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
                    slot_release(s);
                    r->nmissed++;
                    return -1;
                }
                PyErr_Clear();
            }
        }
        r->nmissed++;
        slot_release(s);
    }
    return 0;
}

/* Record a compiled return's `fields` (its nsources; references taken over) with the
 * caller's text and the record's time when it names its caller: whether it was recorded
 * (else refused: the kretprobe's handler serves the call). */
static int
compiled_record(CompiledReturn *c, PyObject **fields, PyObject *caller, int64_t now,
                PyThreadState *ts)
{
    Py_ssize_t nf = c->nsources;
    if (c->record_return != NULL) {
        int recorded = c->record_return(c->record, fields, nf, caller, now, ts) == 0;
        for (Py_ssize_t k = 0; k < nf; k++) {
            Py_DECREF(fields[k]);
        }
        return recorded;
    }
    PyObject *when = NULL;
    if (c->caller) {
        when = PyLong_FromLongLong(now);
        if (when == NULL) {
            PyErr_Clear();
            when = Py_NewRef(Py_None); /* refused by the recorder */
        }
        fields[nf++] = caller;
        fields[nf++] = when;
    }
    PyObject *res = PyObject_Vectorcall(c->record, fields, nf, NULL);
    for (Py_ssize_t k = 0; k < c->nsources; k++) {
        Py_DECREF(fields[k]);
    }
    Py_XDECREF(when);
    if (res == NULL) {
        PyErr_Clear(); /* never raises; if it did: the careful path */
    }
    int recorded = res == Py_False;
    Py_XDECREF(res);
    return recorded;
}

static PyObject *
leave(Rethook *self, PyObject *value, PyObject *exc)
{
    PyThreadState *ts = PyThreadState_Get();
    void *key = frame_key(ts);
    Stack *st = stack_for(self, PyThreadState_GetID(ts), 0);
    Py_ssize_t depth = st ? st->len - 1 : -1;
    while (depth >= 0 && st->nodes[depth].key != key) {
        depth--;
    }
    if (depth < 0) {
        return careful_return(self, value, exc);
    }
    /* Frames above it that ended unseen (none should): forgotten, counted missed. */
    while (st->len > depth + 1) {
        Node gone = st->nodes[--st->len];
        node_miss(&gone, 0);
        node_release(&gone);
    }
    Node node = st->nodes[--st->len];
    if (node.plan == NULL) {
        return careful_return(self, value, exc);
    }
    if (PyDict_GET_SIZE(self->busy) || PyList_GET_ITEM(self->held, 0) != Py_None) {
        /* A handler runs in some thread: the careful return sorts out whether it is this one
         * (a return inside a handler runs none: nmissed) and gives this return Regs of its
         * own (the one hit of this module that runs handlers keeps `cur_*`); it finds the
         * node's instances where it looks for them. */
        int handed = hand_over(self, &node);
        node_release(&node);
        if (handed < 0) {
            return NULL;
        }
        return careful_return(self, value, exc);
    }
    Plan *plan = node.plan;
    Slot *slots = node_slots(&node);
    PyObject *regs = Py_NewRef(self->return_regs);
    PyObject *tid = NULL;
    PyObject *caller = NULL;
    int64_t duration = -1; /* read at the first compiled return that needs it */
    int64_t now = 0;
    int marked = 0;
    Py_ssize_t i = 0;
    int failed = 0;
    while (i < plan->n) {
        Slot s = slots[i];
        RetProbe *r = plan->items[i].ret;
        slots[i].obj = NULL;
        slots[i].compiled = NULL;
        i++;
        if (s.obj == NULL) {
            continue;
        }
        r->inflight--;
        PyObject *handler;
        if (s.compiled != NULL) {
            CompiledReturn *c = s.compiled;
            PyObject *fields[MAX_FIELDS + 2];
            Py_ssize_t nf = c->nsources;
            int acted = 0;
            /* The clocks are read once per return, for every compiled return of the
             * node: the duration's end (a stamp), the record's time (CLOCK_MONOTONIC). */
            if (node.stamp != 0 && duration < 0) {
                if (node.tsc) {
                    duration = stamp_ns(stamp_now() - node.stamp);
                }
                else {
                    now = monotonic_ns(); /* one reading: the duration's end, the record's time */
                    duration = now - node.stamp;
                }
            }
            if (c->count_ns != NULL && node.stamp != 0) {
                /* A latency histogram: counted here (a call entered before the stamp has
                 * no duration: `record` gets the fault). */
                acted = c->count_ns(c->record, duration) == 0;
            }
            else if (nf <= MAX_FIELDS
                && compiled_fields(c, s.obj, value, exc, node.stamp != 0, duration,
                                   fields) == 0) {
                if (c->caller) {
                    if (now == 0) {
                        now = monotonic_ns();
                    }
                    if (caller == NULL) {
                        caller = caller_text(c, ts);
                    }
                    if (caller == NULL) {
                        PyErr_Clear();
                        caller = Py_NewRef(Py_None);
                    }
                }
                acted = compiled_record(c, fields, caller, now, ts);
            }
            else {
                PyErr_Clear();
            }
            if (acted) {
                slot_release(&s);
                continue;
            }
            /* Refused: the kretprobe's own handler serves it, from an instance. */
            if (tid == NULL && (tid = ident_obj()) == NULL) {
                PyErr_Clear();
                r->nmissed++;
                slot_release(&s);
                continue;
            }
            if (compiled_to_instance(self, r, &s, node.stamp, node.tsc, tid) < 0) {
                PyErr_Clear();
                r->nmissed++;
                slot_release(&s);
                continue;
            }
        }
        r->nhit++;
        if (r->handler == Py_None) {
            slot_release(&s);
            continue;
        }
        if (s.obj == Py_None) {
            if (tid == NULL && (tid = ident_obj()) == NULL) {
                PyErr_Clear();
                slot_release(&s);
                continue;
            }
            PyObject *ri = new_instance(self, r, tid);
            if (ri == NULL) {
                PyErr_Clear();
                slot_release(&s);
                continue;
            }
            Py_SETREF(s.obj, ri);
        }
        slot_set(s.obj, self->i_retval, exc != Py_None ? Py_None : value);
        slot_set(s.obj, self->i_exception, exc);
        handler = Py_NewRef(r->handler);
        if (tid == NULL && (tid = ident_obj()) == NULL) {
            failed = 1;
        }
        else if (!marked) {
            if (mark(self, &marked, tid, regs, key) < 0) {
                failed = 1;
            }
            else {
                slot_set(regs, self->r_retval, exc != Py_None ? Py_None : value);
                slot_set(regs, self->r_exception, exc);
            }
        }
        if (!failed) {
            PyObject *hargs[2] = {s.obj, regs};
            cur_ri = s.obj;
            PyObject *res = PyObject_Vectorcall(handler, hargs, 2, NULL);
            cur_ri = NULL;
            if (res == NULL) {
                failed = handler_failed(self, r->rp, "handler") < 0;
            }
            Py_XDECREF(res);
        }
        Py_DECREF(handler);
        PyObject *ri = s.obj;
        s.obj = NULL;
        recycle_instance(self, r, ri);
        if (failed) {
            break;
        }
    }
    unmark(self, marked, tid, regs);
    Py_DECREF(regs);
    Py_XDECREF(caller);
    /* A KeyboardInterrupt left a handler: the calls not served yet are missed. */
    node_miss(&node, i);
    node_release(&node);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Rethook_ret(Rethook *self, PyObject *value)
{
    return leave(self, value, Py_None);
}

static PyObject *
Rethook_unwind(Rethook *self, PyObject *exc)
{
    return leave(self, Py_None, exc);
}

/* drop(item): forget item's calls in flight (their returns run nothing). */
static PyObject *
Rethook_drop(Rethook *self, PyObject *item)
{
    for (Py_ssize_t i = 0; i < self->nstacks; i++) {
        Stack *st = self->stacks[i];
        for (Py_ssize_t j = 0; j < st->len; j++) {
            Node *node = &st->nodes[j];
            if (node->plan == NULL) {
                continue;
            }
            Slot *slots = node_slots(node);
            for (Py_ssize_t k = 0; k < node->plan->n; k++) {
                if ((PyObject *)node->plan->items[k].ret == item) {
                    slot_release(&slots[k]);
                }
            }
        }
    }
    if (PyObject_TypeCheck(item, &RetProbe_Type)) {
        ((RetProbe *)item)->inflight = 0;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Rethook_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))Rethook_publish, METH_FASTCALL,
     "publish(items or None, nparams)"},
    {"set_entry_regs", (PyCFunction)Rethook_set_entry_regs, METH_O, "set_entry_regs(regs)"},
    {"entry", (PyCFunction)(void (*)(void))Rethook_entry, METH_FASTCALL,
     "entry(*values) -> bool"},
    {"ret", (PyCFunction)Rethook_ret, METH_O, "ret(value)"},
    {"unwind", (PyCFunction)Rethook_unwind, METH_O, "unwind(exc)"},
    {"drop", (PyCFunction)Rethook_drop, METH_O, "drop(item)"},
    {NULL},
};

static PyObject *
Rethook_get_careful(Rethook *self, void *c)
{
    return Py_NewRef(self->careful ? self->careful : Py_None);
}

static PyGetSetDef Rethook_getset[] = {
    {"careful", (getter)Rethook_get_careful, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject Rethook_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pykprobes.core._rethook.Rethook",
    .tp_basicsize = sizeof(Rethook),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The kretprobe fast path of rewritten code (see rethook.py).",
    .tp_new = Rethook_new,
    .tp_dealloc = (destructor)Rethook_dealloc,
    .tp_traverse = (traverseproc)Rethook_traverse,
    .tp_clear = (inquiry)Rethook_clear,
    .tp_methods = Rethook_methods,
    .tp_getset = Rethook_getset,
};

/* ------------------------------------------------------------------ module */

static PyObject *
hit_frame(PyObject *mod, PyObject *obj)
{
    if (cur_key == NULL || (obj != cur_regs && obj != cur_ri)) {
        Py_RETURN_NONE;
    }
    PyObject *frame = frame_of_key(cur_key);
    if (frame == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return frame;
}

/* Whether frame objects show their interpreter frame where this module reads it: called
 * from Python code, whose frame is the running one. */
static PyObject *
frames_ok(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    PyThreadState *ts = PyThreadState_Get();
    PyFrameObject *f = PyEval_GetFrame();
    if (f == NULL) {
        Py_RETURN_FALSE;
    }
    if (((FrameHead *)f)->f_frame != frame_key(ts)) {
        Py_RETURN_FALSE;
    }
    PyObject *found = frame_of_key(frame_key(ts));
    int ok = found == (PyObject *)f;
    Py_XDECREF(found);
    PyErr_Clear();
    return PyBool_FromLong(ok);
}

/* frame_call(record, frame, names) -> bool: record(*values of `names` in `frame`), its
 * result; True (not recorded) when a name is unbound or anything fails. core/framecall.py
 * is the specification. */
static PyObject *
frame_call(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyFrame_Check(args[1]) || !PyTuple_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "frame_call(record, frame, names)");
        return NULL;
    }
    PyObject *names = args[2];
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (n > 16) {
        Py_RETURN_TRUE;
    }
    PyObject *values[16] = {NULL};
#if PY_VERSION_HEX >= 0x030C0000
    for (Py_ssize_t i = 0; i < n; i++) {
        values[i] = PyFrame_GetVar((PyFrameObject *)args[1], PyTuple_GET_ITEM(names, i));
        if (values[i] == NULL) {
            PyErr_Clear();
            for (Py_ssize_t k = 0; k < i; k++) {
                Py_DECREF(values[k]);
            }
            Py_RETURN_TRUE;
        }
    }
#else
    PyObject *locals = PyFrame_GetLocals((PyFrameObject *)args[1]);
    if (locals == NULL) {
        PyErr_Clear();
        Py_RETURN_TRUE;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        values[i] = PyObject_GetItem(locals, PyTuple_GET_ITEM(names, i));
        if (values[i] == NULL) {
            PyErr_Clear();
            for (Py_ssize_t k = 0; k < i; k++) {
                Py_DECREF(values[k]);
            }
            Py_DECREF(locals);
            Py_RETURN_TRUE;
        }
    }
    Py_DECREF(locals);
#endif
    PyObject *res = PyObject_Vectorcall(args[0], values, n, NULL);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_DECREF(values[i]);
    }
    if (res == NULL) {
        PyErr_Clear(); /* a recorder never raises; if one did: not recorded */
        Py_RETURN_TRUE;
    }
    int recorded = res == Py_False;
    Py_DECREF(res);
    return PyBool_FromLong(!recorded);
}

/* Whether return records still name their callers from the interpreter frames' heads: no
 * answer of theirs has differed from the frame objects' (caller_text). */
static PyObject *
callers_by_head(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(caller_layout);
}

static PyMethodDef module_methods[] = {
    {"callers_by_head", callers_by_head, METH_NOARGS,
     "Whether return records name their callers from the interpreter frames (caller_text)."},
    {"frame_call", (PyCFunction)(void (*)(void))frame_call, METH_FASTCALL,
     "frame_call(record, frame, names) -> bool: see core/framecall.py"},
    {"hit_frame", hit_frame, METH_O,
     "hit_frame(regs or instance) -> the probed frame of the C hit in flight, or None"},
    {"frames_ok", frames_ok, METH_NOARGS,
     "Whether this interpreter's frame objects are laid out as this module reads them."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pykprobes.core._rethook",
    .m_doc = "The C twin of core/rethook.py.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__rethook(void)
{
    if (PyType_Ready(&CompiledReturn_Type) < 0 || PyType_Ready(&RetProbe_Type) < 0
        || PyType_Ready(&Plan_Type) < 0 || PyType_Ready(&Rethook_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
#ifdef HAVE_TSC
    /* The start of the TSC's calibration window (stamp_setup). */
    tsc_base = __rdtsc();
    raw_base = raw_ns();
#endif
    if (PyModule_AddObjectRef(m, "CompiledReturn", (PyObject *)&CompiledReturn_Type) < 0
        || PyModule_AddObjectRef(m, "RetProbe", (PyObject *)&RetProbe_Type) < 0
        || PyModule_AddObjectRef(m, "Rethook", (PyObject *)&Rethook_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
