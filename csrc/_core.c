/* _core.c: the CPython/NumPy wrapper of the adaloss C core (adaloss._core).
 *
 * Every function: parse, convert, check type, dtype, shape and contiguity with
 * a message naming the argument, expected and actual; release the GIL around
 * the core call; one `fail:` label. Ranges (batch sizes, label values,
 * hyper-parameters) are the core's to check: its ada_error message becomes
 * the exception's (see the error contract in adaloss.h). C objects live in capsules wrapping a
 * small holder that marks the object busy while the GIL is released, so two
 * Python threads cannot run the same object at once. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <limits.h>
#include <string.h>

#include "adaloss.h"

static PyObject *NonFiniteError;

/* ------------------------------------------------------------ holders */

typedef struct {
    void *obj;
    int kind;          /* HOLD_NET, HOLD_HEAD, HOLD_ADAM */
    int busy;
    PyObject *refs;    /* arrays an Adam keeps alive */
} holder;

enum { HOLD_NET = 1, HOLD_HEAD = 2, HOLD_ADAM = 3 };
static const char *hold_names[] = { "", "adaloss.net", "adaloss.head", "adaloss.adam" };

static void holder_destroy(PyObject *capsule)
{
    const char *name = PyCapsule_GetName(capsule);
    holder *hd = PyCapsule_GetPointer(capsule, name);
    if (!hd) { PyErr_Clear(); return; }
    if (hd->kind == HOLD_NET) ada_net_free(hd->obj);
    else if (hd->kind == HOLD_HEAD) ada_head_free(hd->obj);
    else if (hd->kind == HOLD_ADAM) ada_adam_free(hd->obj);
    Py_XDECREF(hd->refs);
    PyMem_Free(hd);
}

static PyObject *holder_new(void *obj, int kind, PyObject *refs)
{
    holder *hd = PyMem_Calloc(1, sizeof(holder));
    if (!hd) return PyErr_NoMemory();
    hd->obj = obj;
    hd->kind = kind;
    hd->refs = refs;
    Py_XINCREF(refs);
    PyObject *cap = PyCapsule_New(hd, hold_names[kind], holder_destroy);
    if (!cap) { Py_XDECREF(refs); PyMem_Free(hd); }
    return cap;
}

/* the holder behind a capsule of the given kind, marked busy; NULL + error */
static holder *acquire(PyObject *capsule, int kind, const char *argname)
{
    if (!PyCapsule_IsValid(capsule, hold_names[kind])) {
        PyErr_Format(PyExc_TypeError, "%s: expected a %s handle, got %.100s",
                     argname, hold_names[kind], Py_TYPE(capsule)->tp_name);
        return NULL;
    }
    holder *hd = PyCapsule_GetPointer(capsule, hold_names[kind]);
    if (hd->busy) {
        PyErr_Format(PyExc_RuntimeError,
                     "%s is in use by another thread; one object cannot run two calls at once",
                     argname);
        return NULL;
    }
    hd->busy = 1;
    return hd;
}

static void release(holder *hd) { if (hd) hd->busy = 0; }

/* ------------------------------------------------------------ arrays */

static const char *dtype_name(PyArrayObject *a)
{
    static char buf[64];
    PyObject *s = PyObject_Str((PyObject *)PyArray_DESCR(a));
    if (!s) { PyErr_Clear(); return "?"; }
    const char *u = PyUnicode_AsUTF8(s);
    snprintf(buf, sizeof buf, "%s", u ? u : "?");
    Py_DECREF(s);
    return buf;
}

static void shape_str(char *buf, size_t len, PyArrayObject *a)
{
    size_t used = snprintf(buf, len, "(");
    for (int i = 0; i < PyArray_NDIM(a) && used < len; i++)
        used += snprintf(buf + used, len - used, i ? ", %lld" : "%lld",
                         (long long)PyArray_DIM(a, i));
    if (used < len) snprintf(buf + used, len - used, PyArray_NDIM(a) == 1 ? ",)" : ")");
}

/* `obj` as a C-contiguous aligned array of float32 (floats of any width are
 * converted) or, when allow_u8, of uint8 as it is. New reference or NULL. */
static PyArrayObject *as_input(PyObject *obj, const char *name, int allow_u8, int *is_u8)
{
    PyArrayObject *arr = (PyArrayObject *)PyArray_FROM_O(obj);
    if (!arr) {
        PyErr_Format(PyExc_TypeError, "%s: expected a NumPy array, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    int type = PyArray_TYPE(arr);
    if (allow_u8 && type == NPY_UINT8) {
        *is_u8 = 1;
        PyArrayObject *out = (PyArrayObject *)PyArray_FromAny(
            (PyObject *)arr, PyArray_DescrFromType(NPY_UINT8), 0, 0,
            NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED, NULL);
        Py_DECREF(arr);
        return out;
    }
    if (!PyTypeNum_ISFLOAT(type)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a float32%s array, got dtype %s", name,
                     allow_u8 ? " or uint8" : "", dtype_name(arr));
        Py_DECREF(arr);
        return NULL;
    }
    if (is_u8) *is_u8 = 0;
    PyArrayObject *out = (PyArrayObject *)PyArray_FromAny(
        (PyObject *)arr, PyArray_DescrFromType(NPY_FLOAT32), 0, 0,
        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST, NULL);
    Py_DECREF(arr);
    return out;
}

/* labels as int64 (N,); the core checks their values. New reference or NULL. */
static PyArrayObject *as_labels(PyObject *obj, npy_intp N)
{
    PyArrayObject *arr = (PyArrayObject *)PyArray_FROM_O(obj), *out = NULL;
    char shape[96];
    if (!arr) {
        PyErr_Format(PyExc_TypeError, "labels: expected an integer array, got %.100s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (!PyTypeNum_ISINTEGER(PyArray_TYPE(arr))) {
        PyErr_Format(PyExc_TypeError, "labels: expected an integer array, got dtype %s",
                     dtype_name(arr));
        goto fail;
    }
    if (PyArray_NDIM(arr) != 1 || PyArray_DIM(arr, 0) != N) {
        shape_str(shape, sizeof shape, arr);
        PyErr_Format(PyExc_ValueError, "labels: expected shape (%lld,), got %s",
                     (long long)N, shape);
        goto fail;
    }
    out = (PyArrayObject *)PyArray_FromAny((PyObject *)arr, PyArray_DescrFromType(NPY_INT64),
                                           1, 1, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                           NPY_ARRAY_FORCECAST, NULL);
    if (!out) goto fail;
    Py_DECREF(arr);
    return out;
fail:
    Py_DECREF(arr);
    return NULL;
}

/* a 1-D float32 view of `count` floats at `data`, kept alive by `base` */
static PyObject *view(float *data, npy_intp count, PyObject *base, int writeable)
{
    PyObject *arr = PyArray_New(&PyArray_Type, 1, &count, NPY_FLOAT32, NULL, data, 0,
                                NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                (writeable ? NPY_ARRAY_WRITEABLE : 0), NULL);
    if (!arr) return NULL;
    Py_INCREF(base);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, base) < 0) { Py_DECREF(arr); return NULL; }
    return arr;
}

static PyObject *raise_status(ada_status st, const ada_error *err)
{
    const char *msg = err->msg[0] ? err->msg : "the C core failed without a message";
    switch (st) {
    case ADA_ENOMEM: PyErr_SetString(PyExc_MemoryError, msg); break;
    case ADA_ENONFINITE: PyErr_SetString(NonFiniteError, msg); break;
    case ADA_ESTATE: PyErr_SetString(PyExc_RuntimeError, msg); break;
    default: PyErr_SetString(PyExc_ValueError, msg); break;
    }
    return NULL;
}

/* the batch dimension as the core's int: a conversion, the core checks the range */
static int fits_int(PyArrayObject *a, const char *name)
{
    if (PyArray_NDIM(a) > 0 && PyArray_DIM(a, 0) > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: expected at most %d rows, got %lld", name, INT_MAX,
                     (long long)PyArray_DIM(a, 0));
        return 0;
    }
    return 1;
}

/* x must be (N, C, H, W) for an image net, (N, D) for a flat one */
static int check_input_shape(PyArrayObject *x, const ada_net *net, const char *name, int flat)
{
    char got[96], want[96];
    int ok;
    if (flat) {
        ok = PyArray_NDIM(x) == 2 && PyArray_DIM(x, 1) == (npy_intp)net->in_c;
        snprintf(want, sizeof want, "(N, %d)", net->in_c);
    } else {
        ok = PyArray_NDIM(x) == 4 && PyArray_DIM(x, 1) == net->in_c &&
             PyArray_DIM(x, 2) == net->in_h && PyArray_DIM(x, 3) == net->in_w;
        snprintf(want, sizeof want, "(N, %d, %d, %d)", net->in_c, net->in_h, net->in_w);
    }
    if (!ok) {
        shape_str(got, sizeof got, x);
        PyErr_Format(PyExc_ValueError, "%s: expected shape %s, got %s", name, want, got);
        return 0;
    }
    return fits_int(x, name);
}

/* ------------------------------------------------------------ threads */

static PyObject *py_set_num_threads(PyObject *self, PyObject *args)
{
    int n;
    ada_error err = {""};
    if (!PyArg_ParseTuple(args, "i:set_num_threads", &n)) return NULL;
    ada_status st = ada_set_num_threads(n, &err);
    if (st != ADA_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs)
{
    return PyLong_FromLong(ada_get_num_threads());
}

/* ------------------------------------------------------------ network */

static PyObject *py_net_create(PyObject *self, PyObject *args)
{
    PyObject *specs_obj, *seq = NULL, *result = NULL;
    int in_c, in_h, in_w;
    ada_layer_spec *specs = NULL;
    ada_error err = {""};
    ada_net *net = NULL;
    if (!PyArg_ParseTuple(args, "O(iii):net_create", &specs_obj, &in_c, &in_h, &in_w)) return NULL;
    seq = PySequence_Fast(specs_obj, "layers: expected a sequence of (kind, a, b, c, d)");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "layers: expected at most %d layers, got %zd", INT_MAX, n);
        goto fail;
    }
    specs = PyMem_Calloc((size_t)n + 1, sizeof(ada_layer_spec));
    if (!specs) { PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* (kind, a, b, c, d): Conv2d (in_channels, out_channels, kernel_size,
         * padding), Linear (in_features, out_features, 0, 0), others zeros */
        ada_layer_spec *sp = &specs[i];
        int a, b, c, d;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iiiii", &sp->kind, &a, &b, &c,
                              &d))
            goto fail;
        if (sp->kind == ADA_LAYER_LINEAR) {
            sp->linear.in_features = a;
            sp->linear.out_features = b;
        } else {
            sp->conv2d.in_channels = a;
            sp->conv2d.out_channels = b;
            sp->conv2d.kernel_size = c;
            sp->conv2d.padding = d;
        }
    }
    ada_status st = ada_net_create(&net, specs, (int)n, in_c, in_h, in_w, &err);
    if (st != ADA_OK) { raise_status(st, &err); goto fail; }
    result = holder_new(net, HOLD_NET, NULL);
    if (!result) ada_net_free(net);
fail:
    PyMem_Free(specs);
    Py_XDECREF(seq);
    return result;
}

static PyObject *py_net_info(PyObject *self, PyObject *args)
{
    PyObject *cap, *layers = NULL;
    if (!PyArg_ParseTuple(args, "O:net_info", &cap)) return NULL;
    holder *hd = acquire(cap, HOLD_NET, "net");
    if (!hd) return NULL;
    ada_net *net = hd->obj;
    layers = PyList_New(net->num_layers);
    if (!layers) goto fail;
    for (int i = 0; i < net->num_layers; i++) {
        ada_layer *L = &net->layers[i];
        PyObject *d = Py_BuildValue("{s:i,s:(iii),s:(iii),s:n,s:n,s:n,s:n,s:i}",
                                    "kind", L->kind, "in_shape", L->in_c, L->in_h, L->in_w,
                                    "out_shape", L->out_c, L->out_h, L->out_w,
                                    "weight_offset", (Py_ssize_t)L->weight_offset,
                                    "weight_size", (Py_ssize_t)L->weight_size,
                                    "bias_offset", (Py_ssize_t)L->bias_offset,
                                    "bias_size", (Py_ssize_t)L->bias_size,
                                    "fused_relu", L->fused_relu);
        if (!d) goto fail;
        PyList_SET_ITEM(layers, i, d);
    }
    release(hd);
    return layers;
fail:
    Py_XDECREF(layers);
    release(hd);
    return NULL;
}

static PyObject *py_net_arrays(PyObject *self, PyObject *args)
{
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O:net_arrays", &cap)) return NULL;
    if (!PyCapsule_IsValid(cap, hold_names[HOLD_NET]))
        return PyErr_Format(PyExc_TypeError, "net: expected a %s handle", hold_names[HOLD_NET]);
    ada_net *net = ((holder *)PyCapsule_GetPointer(cap, hold_names[HOLD_NET]))->obj;
    PyObject *p = view(net->params, (npy_intp)net->num_params, cap, 1);
    PyObject *g = p ? view(net->grads, (npy_intp)net->num_params, cap, 1) : NULL;
    if (!g) { Py_XDECREF(p); return NULL; }
    return Py_BuildValue("(NN)", p, g);
}

static PyObject *py_net_forward(PyObject *self, PyObject *args)
{
    PyObject *cap, *x_obj, *out = NULL;
    int flat;
    PyArrayObject *x = NULL;
    holder *hd = NULL;
    if (!PyArg_ParseTuple(args, "OOp:net_forward", &cap, &x_obj, &flat)) return NULL;
    hd = acquire(cap, HOLD_NET, "net");
    if (!hd) return NULL;
    ada_net *net = hd->obj;
    int is_u8 = 0;
    x = as_input(x_obj, "x", 1, &is_u8);
    if (!x || !check_input_shape(x, net, "x", flat)) goto fail;
    int N = (int)PyArray_DIM(x, 0);
    npy_intp dims[2] = { N, (npy_intp)net->out_size };
    out = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!out) goto fail;
    ada_status st;
    ada_error err = {""};
    const float *y = NULL;
    Py_BEGIN_ALLOW_THREADS
    st = ada_net_forward(net, &y, is_u8 ? NULL : PyArray_DATA(x),
                         is_u8 ? PyArray_DATA(x) : NULL, N, ada_get_num_threads(), &err);
    if (st == ADA_OK && N > 0)
        memcpy(PyArray_DATA((PyArrayObject *)out), y, sizeof(float) * (size_t)N * net->out_size);
    Py_END_ALLOW_THREADS
    if (st != ADA_OK) { raise_status(st, &err); goto fail; }
    Py_DECREF(x);
    release(hd);
    return out;
fail:
    Py_XDECREF(out);
    Py_XDECREF(x);
    release(hd);
    return NULL;
}

static PyObject *py_net_backward(PyObject *self, PyObject *args)
{
    PyObject *cap, *d_obj, *out = NULL;
    int flat;
    PyArrayObject *dout = NULL;
    char got[96];
    if (!PyArg_ParseTuple(args, "OOp:net_backward", &cap, &d_obj, &flat)) return NULL;
    holder *hd = acquire(cap, HOLD_NET, "net");
    if (!hd) return NULL;
    ada_net *net = hd->obj;
    dout = as_input(d_obj, "d_emb", 0, NULL);
    if (!dout) goto fail;
    if (PyArray_NDIM(dout) != 2 || PyArray_DIM(dout, 1) != (npy_intp)net->out_size) {
        shape_str(got, sizeof got, dout);
        PyErr_Format(PyExc_ValueError,
                     "d_emb: expected shape (N, %zu) with N the batch of the last forward, got %s",
                     net->out_size, got);
        goto fail;
    }
    if (!fits_int(dout, "d_emb")) goto fail;
    int N = (int)PyArray_DIM(dout, 0);
    npy_intp dims4[4] = { N, net->in_c, net->in_h, net->in_w };
    npy_intp dims2[2] = { N, (npy_intp)net->in_size };
    out = flat ? PyArray_SimpleNew(2, dims2, NPY_FLOAT32) : PyArray_SimpleNew(4, dims4, NPY_FLOAT32);
    if (!out) goto fail;
    ada_status st;
    ada_error err = {""};
    Py_BEGIN_ALLOW_THREADS
    st = ada_net_backward(net, PyArray_DATA((PyArrayObject *)out), PyArray_DATA(dout), N,
                          ada_get_num_threads(), &err);
    Py_END_ALLOW_THREADS
    if (st != ADA_OK) { raise_status(st, &err); goto fail; }
    Py_DECREF(dout);
    release(hd);
    return out;
fail:
    Py_XDECREF(out);
    Py_XDECREF(dout);
    release(hd);
    return NULL;
}

/* ------------------------------------------------------------ heads */

static PyObject *py_head_create(PyObject *self, PyObject *args)
{
    int kind, variant, C, D;
    float s, m, h, t_alpha;
    if (!PyArg_ParseTuple(args, "iiiiffff:head_create", &kind, &variant, &C, &D, &s, &m, &h,
                          &t_alpha))
        return NULL;
    ada_head *head = NULL;
    ada_error err = {""};
    ada_status st = ada_head_create(&head, kind, variant, C, D, s, m, h, t_alpha, &err);
    if (st != ADA_OK) return raise_status(st, &err);
    PyObject *cap = holder_new(head, HOLD_HEAD, NULL);
    if (!cap) ada_head_free(head);
    return cap;
}

static PyObject *py_head_arrays(PyObject *self, PyObject *args)
{
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O:head_arrays", &cap)) return NULL;
    if (!PyCapsule_IsValid(cap, hold_names[HOLD_HEAD]))
        return PyErr_Format(PyExc_TypeError, "head: expected a %s handle", hold_names[HOLD_HEAD]);
    ada_head *head = ((holder *)PyCapsule_GetPointer(cap, hold_names[HOLD_HEAD]))->obj;
    npy_intp n = (npy_intp)head->num_classes * head->embedding_dim;
    PyObject *w = view(head->weight, n, cap, 1);
    PyObject *g = w ? view(head->weight_grad, n, cap, 1) : NULL;
    if (!g) { Py_XDECREF(w); return NULL; }
    return Py_BuildValue("(NN)", w, g);
}

static PyArrayObject *as_embedding(PyObject *obj, const ada_head *head)
{
    char got[96];
    PyArrayObject *e = as_input(obj, "emb", 0, NULL);
    if (!e) return NULL;
    if (PyArray_NDIM(e) != 2 || PyArray_DIM(e, 1) != head->embedding_dim) {
        shape_str(got, sizeof got, e);
        PyErr_Format(PyExc_ValueError, "emb: expected shape (N, %d) (embedding_dim), got %s",
                     head->embedding_dim, got);
        Py_DECREF(e);
        return NULL;
    }
    if (!fits_int(e, "emb")) { Py_DECREF(e); return NULL; }
    return e;
}

static PyObject *py_head_forward(PyObject *self, PyObject *args)
{
    PyObject *cap, *e_obj, *l_obj;
    int training;
    PyArrayObject *e = NULL, *lab = NULL;
    if (!PyArg_ParseTuple(args, "OOOp:head_forward", &cap, &e_obj, &l_obj, &training)) return NULL;
    holder *hd = acquire(cap, HOLD_HEAD, "head");
    if (!hd) return NULL;
    ada_head *head = hd->obj;
    float loss = 0.0f;
    ada_status st;
    ada_error err = {""};
    e = as_embedding(e_obj, head);
    if (!e) goto fail;
    lab = as_labels(l_obj, PyArray_DIM(e, 0));
    if (!lab) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = ada_head_forward(head, &loss, PyArray_DATA(e), PyArray_DATA(lab),
                          (int)PyArray_DIM(e, 0), training, ada_get_num_threads(), &err);
    Py_END_ALLOW_THREADS
    if (st != ADA_OK) { raise_status(st, &err); goto fail; }
    Py_DECREF(e); Py_DECREF(lab);
    release(hd);
    return PyFloat_FromDouble(loss);
fail:
    Py_XDECREF(e); Py_XDECREF(lab);
    release(hd);
    return NULL;
}

static PyObject *py_head_backward(PyObject *self, PyObject *args)
{
    PyObject *cap, *out = NULL;
    int accumulate;
    if (!PyArg_ParseTuple(args, "Op:head_backward", &cap, &accumulate)) return NULL;
    holder *hd = acquire(cap, HOLD_HEAD, "head");
    if (!hd) return NULL;
    ada_head *head = hd->obj;
    npy_intp dims[2] = { head->has_forward ? head->cached_n : 0, head->embedding_dim };
    out = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!out) goto fail;
    ada_status st;
    ada_error err = {""};
    Py_BEGIN_ALLOW_THREADS
    st = ada_head_backward(head, PyArray_DATA((PyArrayObject *)out), accumulate,
                           ada_get_num_threads(), &err);
    Py_END_ALLOW_THREADS
    if (st != ADA_OK) { raise_status(st, &err); goto fail; }
    release(hd);
    return out;
fail:
    Py_XDECREF(out);
    release(hd);
    return NULL;
}

static PyObject *py_head_logits(PyObject *self, PyObject *args)
{
    PyObject *cap, *e_obj, *l_obj, *out = NULL;
    int rule;
    PyArrayObject *e = NULL, *lab = NULL;
    if (!PyArg_ParseTuple(args, "OOOi:head_logits", &cap, &e_obj, &l_obj, &rule)) return NULL;
    holder *hd = acquire(cap, HOLD_HEAD, "head");
    if (!hd) return NULL;
    ada_head *head = hd->obj;
    e = as_embedding(e_obj, head);
    if (!e) goto fail;
    if (l_obj != Py_None) {
        lab = as_labels(l_obj, PyArray_DIM(e, 0));
        if (!lab) goto fail;
    }
    int N = (int)PyArray_DIM(e, 0);
    npy_intp dims[2] = { N, head->num_classes };
    out = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!out) goto fail;
    ada_status st;
    ada_error err = {""};
    Py_BEGIN_ALLOW_THREADS
    st = ada_head_logits(head, PyArray_DATA((PyArrayObject *)out), PyArray_DATA(e),
                         lab ? PyArray_DATA(lab) : NULL, N, rule, ada_get_num_threads(), &err);
    Py_END_ALLOW_THREADS
    if (st != ADA_OK) { raise_status(st, &err); goto fail; }
    Py_DECREF(e); Py_XDECREF(lab);
    release(hd);
    return out;
fail:
    Py_XDECREF(out); Py_XDECREF(e); Py_XDECREF(lab);
    release(hd);
    return NULL;
}

/* running statistics and the last forward's q and theta_y */
static PyObject *py_head_state(PyObject *self, PyObject *args)
{
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O:head_state", &cap)) return NULL;
    holder *hd = acquire(cap, HOLD_HEAD, "head");
    if (!hd) return NULL;
    ada_head *head = hd->obj;
    npy_intp n = head->has_forward || head->cached_n ? head->cached_n : 0;
    PyObject *q = PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    PyObject *a = PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    if (q && a && n) {
        memcpy(PyArray_DATA((PyArrayObject *)q), head->quality, sizeof(float) * n);
        memcpy(PyArray_DATA((PyArrayObject *)a), head->target_angle, sizeof(float) * n);
    }
    release(hd);
    if (!q || !a) { Py_XDECREF(q); Py_XDECREF(a); return NULL; }
    return Py_BuildValue("{s:d,s:d,s:N,s:N}", "running_mean", (double)head->running_mean,
                         "running_std", (double)head->running_std, "quality", q,
                         "target_angle", a);
}

static PyObject *py_head_set_stats(PyObject *self, PyObject *args)
{
    PyObject *cap;
    float mean, std;
    if (!PyArg_ParseTuple(args, "Off:head_set_stats", &cap, &mean, &std)) return NULL;
    holder *hd = acquire(cap, HOLD_HEAD, "head");
    if (!hd) return NULL;
    ada_error err = {""};
    ada_status st = ada_head_set_running_stats(hd->obj, mean, std, &err);
    release(hd);
    if (st != ADA_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

static PyObject *py_head_set_margin(PyObject *self, PyObject *args)
{
    PyObject *cap;
    int rule;
    float m1, m2, m3;
    if (!PyArg_ParseTuple(args, "Oifff:head_set_margin", &cap, &rule, &m1, &m2, &m3))
        return NULL;
    holder *hd = acquire(cap, HOLD_HEAD, "head");
    if (!hd) return NULL;
    ada_error err = {""};
    ada_status st = ada_head_set_margin(hd->obj, rule, m1, m2, m3, &err);
    release(hd);
    if (st != ADA_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

static PyObject *py_head_set_m(PyObject *self, PyObject *args)
{
    PyObject *cap;
    float m;
    if (!PyArg_ParseTuple(args, "Of:head_set_m", &cap, &m)) return NULL;
    holder *hd = acquire(cap, HOLD_HEAD, "head");
    if (!hd) return NULL;
    ada_error err = {""};
    ada_status st = ada_head_set_m(hd->obj, m, &err);
    release(hd);
    if (st != ADA_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------ adam */

static PyObject *py_adam_create(PyObject *self, PyObject *args)
{
    PyObject *pairs_obj, *seq = NULL, *refs = NULL, *cap = NULL;
    float lr, b1, b2, eps, wd;
    float **params = NULL, **grads = NULL;
    size_t *sizes = NULL;
    if (!PyArg_ParseTuple(args, "Offfff:adam_create", &pairs_obj, &lr, &b1, &b2, &eps, &wd))
        return NULL;
    seq = PySequence_Fast(pairs_obj, "params: expected a sequence of (data, grad) arrays");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    params = PyMem_Calloc((size_t)n + 1, sizeof(float *));
    grads = PyMem_Calloc((size_t)n + 1, sizeof(float *));
    sizes = PyMem_Calloc((size_t)n + 1, sizeof(size_t));
    refs = PyList_New(0);
    if (!params || !grads || !sizes || !refs) { PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i), *pd, *pg;
        if (!PyArg_ParseTuple(pair, "OO", &pd, &pg)) goto fail;
        for (int k = 0; k < 2; k++) {
            PyObject *o = k ? pg : pd;
            if (!PyArray_Check(o) || PyArray_TYPE((PyArrayObject *)o) != NPY_FLOAT32 ||
                !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)o) ||
                !PyArray_ISWRITEABLE((PyArrayObject *)o)) {
                PyErr_Format(PyExc_TypeError,
                             "params[%zd].%s: expected a writeable C-contiguous float32 array",
                             i, k ? "grad" : "data");
                goto fail;
            }
            if (PyList_Append(refs, o) < 0) goto fail;
        }
        if (PyArray_SIZE((PyArrayObject *)pd) != PyArray_SIZE((PyArrayObject *)pg)) {
            PyErr_Format(PyExc_ValueError, "params[%zd]: data and grad differ in size", i);
            goto fail;
        }
        params[i] = PyArray_DATA((PyArrayObject *)pd);
        grads[i] = PyArray_DATA((PyArrayObject *)pg);
        sizes[i] = (size_t)PyArray_SIZE((PyArrayObject *)pd);
    }
    if (n > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "params: expected at most %d arrays, got %zd", INT_MAX, n);
        goto fail;
    }
    ada_adam *adam = NULL;
    ada_error err = {""};
    ada_status st = ada_adam_create(&adam, (int)n, params, grads, sizes, lr, b1, b2, eps, wd,
                                    &err);
    if (st != ADA_OK) { raise_status(st, &err); goto fail; }
    cap = holder_new(adam, HOLD_ADAM, refs);
    if (!cap) ada_adam_free(adam);
fail:
    PyMem_Free(params); PyMem_Free(grads); PyMem_Free(sizes);
    Py_XDECREF(refs);
    Py_XDECREF(seq);
    return cap;
}

static PyObject *py_adam_step(PyObject *self, PyObject *args)
{
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O:adam_step", &cap)) return NULL;
    holder *hd = acquire(cap, HOLD_ADAM, "optimizer");
    if (!hd) return NULL;
    Py_BEGIN_ALLOW_THREADS
    ada_adam_step(hd->obj, ada_get_num_threads());
    Py_END_ALLOW_THREADS
    release(hd);
    Py_RETURN_NONE;
}

static PyObject *py_adam_zero_grad(PyObject *self, PyObject *args)
{
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O:adam_zero_grad", &cap)) return NULL;
    holder *hd = acquire(cap, HOLD_ADAM, "optimizer");
    if (!hd) return NULL;
    ada_adam_zero_grad(hd->obj);
    release(hd);
    Py_RETURN_NONE;
}

/* views of the moments, the step count and the hyper-parameters */
static PyObject *py_adam_state(PyObject *self, PyObject *args)
{
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O:adam_state", &cap)) return NULL;
    if (!PyCapsule_IsValid(cap, hold_names[HOLD_ADAM]))
        return PyErr_Format(PyExc_TypeError, "optimizer: expected a %s handle", hold_names[HOLD_ADAM]);
    ada_adam *adam = ((holder *)PyCapsule_GetPointer(cap, hold_names[HOLD_ADAM]))->obj;
    PyObject *m = view(adam->m, (npy_intp)adam->total, cap, 1);
    PyObject *v = m ? view(adam->v, (npy_intp)adam->total, cap, 1) : NULL;
    if (!v) { Py_XDECREF(m); return NULL; }
    return Py_BuildValue("{s:N,s:N,s:L,s:d,s:d,s:d,s:d,s:d}", "exp_avg", m, "exp_avg_sq", v,
                         "step", (long long)adam->step, "lr", (double)adam->lr,
                         "beta1", (double)adam->beta1, "beta2", (double)adam->beta2,
                         "eps", (double)adam->eps, "weight_decay", (double)adam->weight_decay);
}

static PyObject *py_adam_set(PyObject *self, PyObject *args)
{
    PyObject *cap;
    long long step;
    float lr;
    if (!PyArg_ParseTuple(args, "OLf:adam_set", &cap, &step, &lr)) return NULL;
    holder *hd = acquire(cap, HOLD_ADAM, "optimizer");
    if (!hd) return NULL;
    ada_error err = {""};
    ada_status st = ada_adam_set(hd->obj, (int64_t)step, lr, &err);
    release(hd);
    if (st != ADA_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------ train step */

static PyObject *py_train_step(PyObject *self, PyObject *args)
{
    PyObject *ncap, *hcap, *acap, *x_obj, *l_obj;
    int flat, head_trained;
    PyArrayObject *x = NULL, *lab = NULL;
    holder *hn = NULL, *hh = NULL, *ha = NULL;
    float loss = 0.0f;
    if (!PyArg_ParseTuple(args, "OOOOOpp:train_step", &ncap, &hcap, &acap, &x_obj, &l_obj,
                          &flat, &head_trained))
        return NULL;
    if (!(hn = acquire(ncap, HOLD_NET, "net"))) goto fail;
    if (!(hh = acquire(hcap, HOLD_HEAD, "head"))) goto fail;
    if (!(ha = acquire(acap, HOLD_ADAM, "optimizer"))) goto fail;
    ada_net *net = hn->obj;
    int is_u8 = 0;
    x = as_input(x_obj, "x", 1, &is_u8);
    if (!x || !check_input_shape(x, net, "x", flat)) goto fail;
    lab = as_labels(l_obj, PyArray_DIM(x, 0));
    if (!lab) goto fail;
    ada_status st;
    ada_error err = {""};
    Py_BEGIN_ALLOW_THREADS
    st = ada_train_step(net, hh->obj, ha->obj, &loss, is_u8 ? NULL : PyArray_DATA(x),
                        is_u8 ? PyArray_DATA(x) : NULL, PyArray_DATA(lab),
                        (int)PyArray_DIM(x, 0), head_trained, ada_get_num_threads(), &err);
    Py_END_ALLOW_THREADS
    if (st != ADA_OK) { raise_status(st, &err); goto fail; }
    Py_DECREF(x); Py_DECREF(lab);
    release(hn); release(hh); release(ha);
    return PyFloat_FromDouble(loss);
fail:
    Py_XDECREF(x); Py_XDECREF(lab);
    release(hn); release(hh); release(ha);
    return NULL;
}

/* ------------------------------------------------------------ test hooks */

/* C = op(A) op(B) through ada_sgemm (reference=0) or the naive loop (1) */
static PyObject *py_gemm(PyObject *self, PyObject *args)
{
    PyObject *a_obj, *b_obj, *out = NULL;
    int ta, tb, reference;
    PyArrayObject *A = NULL, *B = NULL;
    if (!PyArg_ParseTuple(args, "OOppp:gemm", &a_obj, &b_obj, &ta, &tb, &reference)) return NULL;
    A = as_input(a_obj, "a", 0, NULL);
    B = A ? as_input(b_obj, "b", 0, NULL) : NULL;
    if (!B) goto fail;
    if (PyArray_NDIM(A) != 2 || PyArray_NDIM(B) != 2) {
        PyErr_SetString(PyExc_ValueError, "a, b: expected 2-D arrays");
        goto fail;
    }
    int M = (int)PyArray_DIM(A, ta ? 1 : 0), K = (int)PyArray_DIM(A, ta ? 0 : 1);
    int KB = (int)PyArray_DIM(B, tb ? 1 : 0), N = (int)PyArray_DIM(B, tb ? 0 : 1);
    if (K != KB) {
        PyErr_Format(PyExc_ValueError, "b: inner dimension %d differs from a's %d", KB, K);
        goto fail;
    }
    npy_intp dims[2] = { M, N };
    out = PyArray_ZEROS(2, dims, NPY_FLOAT32, 0);
    if (!out) goto fail;
    int threads = ada_get_num_threads();
    Py_BEGIN_ALLOW_THREADS
    if (reference)
        ada_sgemm_reference(ta, tb, M, N, K, 1.0f, PyArray_DATA(A), (int)PyArray_DIM(A, 1),
                            PyArray_DATA(B), (int)PyArray_DIM(B, 1), 0.0f,
                            PyArray_DATA((PyArrayObject *)out), N);
    else
        ada_sgemm(ta, tb, M, N, K, 1.0f, PyArray_DATA(A), (int)PyArray_DIM(A, 1),
                  PyArray_DATA(B), (int)PyArray_DIM(B, 1), 0.0f,
                  PyArray_DATA((PyArrayObject *)out), N, threads);
    Py_END_ALLOW_THREADS
    Py_DECREF(A); Py_DECREF(B);
    return out;
fail:
    Py_XDECREF(A); Py_XDECREF(B); Py_XDECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "set_num_threads(n): threads for the C core"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"net_create", py_net_create, METH_VARARGS, "net_create(layers, (c, h, w)) -> handle"},
    {"net_info", py_net_info, METH_VARARGS, "net_info(net) -> list of layer dicts"},
    {"net_arrays", py_net_arrays, METH_VARARGS, "net_arrays(net) -> (params, grads) views"},
    {"net_forward", py_net_forward, METH_VARARGS, "net_forward(net, x, flat) -> (N, D)"},
    {"net_backward", py_net_backward, METH_VARARGS, "net_backward(net, d_emb, flat) -> dx"},
    {"head_create", py_head_create, METH_VARARGS, "head_create(kind, variant, C, D, s, m, h, t_alpha)"},
    {"head_arrays", py_head_arrays, METH_VARARGS, "head_arrays(head) -> (weight, weight_grad) views"},
    {"head_forward", py_head_forward, METH_VARARGS, "head_forward(head, emb, labels, training) -> loss"},
    {"head_backward", py_head_backward, METH_VARARGS, "head_backward(head, accumulate_weight) -> d_emb"},
    {"head_logits", py_head_logits, METH_VARARGS, "head_logits(head, emb, labels|None, rule) -> logits"},
    {"head_state", py_head_state, METH_VARARGS, "head_state(head) -> dict"},
    {"head_set_stats", py_head_set_stats, METH_VARARGS, "head_set_stats(head, mean, std)"},
    {"head_set_margin", py_head_set_margin, METH_VARARGS,
     "head_set_margin(head, rule, m1, m2, m3)"},
    {"head_set_m", py_head_set_m, METH_VARARGS, "head_set_m(head, m)"},
    {"adam_create", py_adam_create, METH_VARARGS, "adam_create([(data, grad)], lr, b1, b2, eps, wd)"},
    {"adam_step", py_adam_step, METH_VARARGS, "adam_step(adam)"},
    {"adam_zero_grad", py_adam_zero_grad, METH_VARARGS, "adam_zero_grad(adam)"},
    {"adam_state", py_adam_state, METH_VARARGS, "adam_state(adam) -> dict with moment views"},
    {"adam_set", py_adam_set, METH_VARARGS, "adam_set(adam, step, lr)"},
    {"train_step", py_train_step, METH_VARARGS, "train_step(net, head, adam, x, labels, flat, head_trained) -> loss"},
    {"gemm", py_gemm, METH_VARARGS, "gemm(a, b, trans_a, trans_b, reference) -> op(a) @ op(b)"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_core", "adaloss C core: layers, margin heads, Adam, training step.",
    -1, methods
};

PyMODINIT_FUNC PyInit__core(void)
{
    import_array();
    PyObject *mod = PyModule_Create(&module);
    if (!mod) return NULL;
    NonFiniteError = PyErr_NewExceptionWithDoc(
        "adaloss._core.NonFiniteError",
        "A training step produced a non-finite loss or gradient; it was not applied.",
        PyExc_FloatingPointError, NULL);
    if (!NonFiniteError || PyModule_AddObjectRef(mod, "NonFiniteError", NonFiniteError) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    /* the enums of adaloss.h, so Python never copies their values */
    static const struct { const char *name; int value; } constants[] = {
        {"OK", ADA_OK}, {"ENOMEM", ADA_ENOMEM}, {"EINVAL", ADA_EINVAL},
        {"ENONFINITE", ADA_ENONFINITE}, {"ESTATE", ADA_ESTATE},
        {"HEAD_SOFTMAX", ADA_HEAD_SOFTMAX}, {"HEAD_COSFACE", ADA_HEAD_COSFACE},
        {"HEAD_ARCFACE", ADA_HEAD_ARCFACE}, {"HEAD_ADAFACE", ADA_HEAD_ADAFACE},
        {"HEAD_COMBINED", ADA_HEAD_COMBINED},
        {"MARGIN_FALLBACK", ADA_MARGIN_FALLBACK}, {"MARGIN_EASY", ADA_MARGIN_EASY},
        {"MARGIN_CLIP", ADA_MARGIN_CLIP},
        {"MARGIN_STRAIGHT_THROUGH", ADA_MARGIN_STRAIGHT_THROUGH},
        {"VARIANT_PAPER", ADA_VARIANT_PAPER}, {"VARIANT_REPORT", ADA_VARIANT_REPORT},
        {"RULE_PLAIN", ADA_RULE_PLAIN}, {"RULE_REPORT", ADA_RULE_REPORT},
        {"LAYER_CONV2D", ADA_LAYER_CONV2D}, {"LAYER_RELU", ADA_LAYER_RELU},
        {"LAYER_MAXPOOL2D", ADA_LAYER_MAXPOOL2D}, {"LAYER_FLATTEN", ADA_LAYER_FLATTEN},
        {"LAYER_LINEAR", ADA_LAYER_LINEAR}, {"LAYER_L2NORM", ADA_LAYER_L2NORM},
        {"MAX_THREADS", ADA_MAX_THREADS}, {"MAX_BATCH", ADA_MAX_BATCH},
    };
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++)
        if (PyModule_AddIntConstant(mod, constants[i].name, constants[i].value) < 0) {
            Py_DECREF(mod);
            return NULL;
        }
    return mod;
}
