/* module.c — lca._C: the only file that includes Python.h and NumPy.
 *
 * Three functions, called by lca/__init__.py with validated, batched NumPy arrays (the Python
 * layer gives users the argument-naming errors; the checks here only guard the engine against
 * direct misuse).  Each builds one lca_params, releases the GIL, runs the engine and raises on
 * failure.  Outputs are preallocated by the caller and written in place.
 *
 *   condense(q, k, v, kbar, vbar, anchor, alpha, g, n, scale, d_score, d_pool, v_in_k)
 *   attend(q, k, v, kbar, vbar, out, lse, g, w, scale, rep_bias, v_in_k)
 *   backward(dout, q, k, v, out, lse, dq, dk, dv, g, w, n, scale, rep_bias, d_score, d_pool,
 *            v_in_k)
 *   decode_step(q, k, v, out, kbar, vbar, kr, vr, qsum, T, g, w, n, scale, rep_bias, d_score,
 *               d_pool, v_in_k)                     one step of the condensed cache (lca/cache.py)
 * and, when built with the CUDA engine (LCA_WITH_CUDA), cuda_condense, cuda_attend,
 * cuda_backward (+ cuda_backward_workspace) and cuda_decode_step, which take device-array
 * descriptors from lca/_cuda.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <numpy/arrayobject.h>

#include "lca.h"

/* Check that o is a NumPy array of rank ndim, dtype typenum (writable if asked), with a
 * contiguous last dimension and non-negative strides; fill shape and the element-stride view. */
static int view_of(PyObject *o, const char *name, int ndim, int typenum, int writable,
                   npy_intp *shape, lca_view *v) {
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a NumPy array", name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions, got %d", name, ndim,
                     PyArray_NDIM(a));
        return -1;
    }
    if (PyArray_TYPE(a) != typenum) {
        PyErr_Format(PyExc_TypeError, "%s: unexpected dtype", name);
        return -1;
    }
    if (writable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: output array is read-only", name);
        return -1;
    }
    const npy_intp item = PyArray_ITEMSIZE(a), *st = PyArray_STRIDES(a);
    const int empty = PyArray_SIZE(a) == 0;          /* strides of an empty array are moot */
    if (!empty && !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s: data must be aligned to its element size", name);
        return -1;
    }
    for (int i = 0; i < ndim; i++) {
        shape[i] = PyArray_DIM(a, i);
        if (!empty && (st[i] < 0 || st[i] % item || (i == ndim - 1 && shape[i] > 1 && st[i] != item))) {
            PyErr_Format(PyExc_ValueError, "%s: strides must be non-negative, whole elements, "
                         "with a contiguous last dimension", name);
            return -1;
        }
    }
    v->p = PyArray_DATA(a);
    v->sb = st[0] / item;
    v->st = st[1] / item;
    v->sh = ndim > 2 ? st[2] / item : 0;
    return 0;
}

static int same_shape(const char *name, const npy_intp *got, const npy_intp *want, int ndim) {
    for (int i = 0; i < ndim; i++)
        if (got[i] != want[i]) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d is %zd, expected %zd", name, i,
                         (Py_ssize_t)got[i], (Py_ssize_t)want[i]);
            return -1;
        }
    return 0;
}

static int same_view(const lca_view *a, const lca_view *b) {
    return a->p == b->p && a->sb == b->sb && a->st == b->st && a->sh == b->sh;
}

/* Sizes from the shapes of q (B, L, H, D), k (B, L, Hkv, D), v (B, L, Hkv, Dv), checked. */
static int qkv_sizes(lca_params *p, const npy_intp *sq, const npy_intp *sk, const npy_intp *sv) {
    p->B = sq[0], p->L = sq[1], p->H = sq[2], p->D = sq[3], p->Hkv = sk[2], p->Dv = sv[3];
    npy_intp wk[4] = {p->B, p->L, p->Hkv, p->D}, wv[4] = {p->B, p->L, p->Hkv, p->Dv};
    if (same_shape("k", sk, wk, 4) || same_shape("v", sv, wv, 3)) return -1;
    if (p->H < 1 || p->Hkv < 1 || p->H % p->Hkv || p->D < 1 || p->Dv < 1) {
        PyErr_SetString(PyExc_ValueError, "q, k, v: heads must be a multiple of kv heads >= 1 "
                        "and widths >= 1");
        return -1;
    }
    return 0;
}

/* q, k, v and the sizes, dtype and kv geometry shared by all three entry points. */
static int qkv_params(lca_params *p, PyObject *q, PyObject *k, PyObject *v) {
    npy_intp sq[4], sk[4], sv[4];
    if (!PyArray_Check(q)) {
        PyErr_SetString(PyExc_TypeError, "q: expected a NumPy array");
        return -1;
    }
    int typenum = PyArray_TYPE((PyArrayObject *)q);
    if (typenum != NPY_FLOAT32 && typenum != NPY_FLOAT64) {
        PyErr_SetString(PyExc_TypeError, "q: expected dtype float32 or float64");
        return -1;
    }
    p->dtype = typenum == NPY_FLOAT32 ? LCA_F32 : LCA_F64;
    if (view_of(q, "q", 4, typenum, 0, sq, &p->q) || view_of(k, "k", 4, typenum, 0, sk, &p->k) ||
        view_of(v, "v", 4, typenum, 0, sv, &p->v))
        return -1;
    if (qkv_sizes(p, sq, sk, sv)) return -1;
    return typenum;
}

static int lca_params_check(lca_params *p) {
    if (p->g < 1 || p->g > INT32_MAX || p->w < 0 || p->n < 1 || p->n > p->g) {
        PyErr_SetString(PyExc_ValueError, "group_size, window or n_summary out of range");
        return -1;
    }
    if (p->w > p->L) p->w = p->L;
    if (p->d_score < 1 || p->d_score > p->D || p->d_pool < 0 || p->d_pool > p->D) {
        PyErr_SetString(PyExc_ValueError, "d_score or d_pool out of range");
        return -1;
    }
    if (p->v_in_k && (p->Dv > p->d_pool || !same_view(&p->v, &p->k))) {
        PyErr_SetString(PyExc_ValueError, "v_in_k: v must be a prefix view of k within d_pool");
        return -1;
    }
    if (!isfinite(p->scale) || !isfinite(p->rep_bias)) {
        PyErr_SetString(PyExc_ValueError, "softmax_scale and rep_bias must be finite");
        return -1;
    }
    /* below float64 the engines compute with (float)scale and (float)rep_bias: past FLT_MAX
     * those are inf, and every answer NaN */
    if (p->dtype != LCA_F64 && (fabs(p->scale) > FLT_MAX || fabs(p->rep_bias) > FLT_MAX)) {
        PyErr_SetString(PyExc_ValueError, fabs(p->scale) > FLT_MAX
                        ? "softmax_scale: beyond the float32 range (3.4e38) of these inputs"
                        : "rep_bias: beyond the float32 range (3.4e38) of these inputs");
        return -1;
    }
    return 0;
}

static PyObject *finish(int status, const char *err) {
    if (status != LCA_OK) {
        PyErr_SetString(status == LCA_ERR_NOMEM ? PyExc_MemoryError : PyExc_RuntimeError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(condense_doc, "condense(q, k, v, kbar, vbar, anchor, alpha, g, n, scale, d_score, "
             "d_pool, v_in_k): SPEC §2/§4 condensation into kbar, vbar, anchor, alpha.");

static PyObject *py_condense(PyObject *self, PyObject *args) {
    PyObject *q, *k, *v, *kbar, *vbar, *anchor, *alpha;
    lca_params p = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOLLdLLi", &q, &k, &v, &kbar, &vbar, &anchor, &alpha, &p.g,
                          &p.n, &p.scale, &p.d_score, &p.d_pool, &p.v_in_k))
        return NULL;
    int typenum = qkv_params(&p, q, k, v);
    if (typenum < 0 || lca_params_check(&p)) return NULL;
    p.m = p.L / p.g;
    npy_intp s[4], wk[4] = {p.B, p.m, p.Hkv, p.D}, wv[4] = {p.B, p.m, p.Hkv, p.Dv};
    npy_intp wa[4] = {p.B, p.m, p.Hkv, p.g};
    if (view_of(kbar, "kbar", 4, typenum, 1, s, &p.kbar) || same_shape("kbar", s, wk, 4) ||
        view_of(vbar, "vbar", 4, typenum, 1, s, &p.vbar) || same_shape("vbar", s, wv, 4) ||
        view_of(anchor, "anchor", 3, NPY_INT32, 1, s, &p.anchor) ||
        same_shape("anchor", s, wa, 3) || view_of(alpha, "alpha", 4, typenum, 1, s, &p.alpha) ||
        same_shape("alpha", s, wa, 4))
        return NULL;
    if (p.v_in_k && !same_view(&p.vbar, &p.kbar)) {
        PyErr_SetString(PyExc_ValueError, "v_in_k: vbar must be a prefix view of kbar");
        return NULL;
    }
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cpu_condense(&p, err, sizeof err);
    Py_END_ALLOW_THREADS
    return finish(status, err);
}

/* kbar/vbar (any number m >= the last query's G_t of rows), out, lse: shared by attend and
 * backward. */
static int attend_views(lca_params *p, int typenum, PyObject *out, PyObject *lse, int writable) {
    npy_intp s[4], wo[4] = {p->B, p->L, p->H, p->Dv}, wl[3] = {p->B, p->H, p->L};
    if (view_of(out, "out", 4, typenum, writable, s, &p->out) || same_shape("out", s, wo, 4) ||
        view_of(lse, "lse", 3, typenum, writable, s, &p->lse) || same_shape("lse", s, wl, 3))
        return -1;
    return 0;
}

/* kbar (B, m, Hkv, D) and vbar (B, m, Hkv, Dv) given to attend, shapes sk and sv: any number m
 * of rows at least the last query's G_t; with v_in_k, vbar must be kbar's prefix view. */
static int given_condensed(lca_params *p, const npy_intp *sk, const npy_intp *sv) {
    p->m = sk[1];
    const int64_t need = p->L ? lca_num_condensed(p->L - 1, p->g, p->w) : 0;
    npy_intp wk[4] = {p->B, p->m, p->Hkv, p->D}, wv[4] = {p->B, p->m, p->Hkv, p->Dv};
    if (same_shape("kbar", sk, wk, 4) || same_shape("vbar", sv, wv, 4)) return -1;
    if (p->m < need) {
        PyErr_Format(PyExc_ValueError, "kbar: %zd condensed entries, the last query needs %zd",
                     (Py_ssize_t)p->m, (Py_ssize_t)need);
        return -1;
    }
    if (p->v_in_k && !same_view(&p->vbar, &p->kbar)) {
        PyErr_SetString(PyExc_ValueError, "v_in_k: vbar must be a prefix view of kbar");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(attend_doc, "attend(q, k, v, kbar, vbar, out, lse, g, w, scale, rep_bias, v_in_k): "
             "SPEC §3 attention into out and lse.");

static PyObject *py_attend(PyObject *self, PyObject *args) {
    PyObject *q, *k, *v, *kbar, *vbar, *out, *lse;
    lca_params p = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOLLddi", &q, &k, &v, &kbar, &vbar, &out, &lse, &p.g, &p.w,
                          &p.scale, &p.rep_bias, &p.v_in_k))
        return NULL;
    int typenum = qkv_params(&p, q, k, v);
    p.n = 1, p.d_score = p.d_pool = p.D;
    if (typenum < 0 || lca_params_check(&p)) return NULL;
    npy_intp sk[4], sv[4];
    if (view_of(kbar, "kbar", 4, typenum, 0, sk, &p.kbar) ||
        view_of(vbar, "vbar", 4, typenum, 0, sv, &p.vbar) || attend_views(&p, typenum, out, lse, 1))
        return NULL;
    if (given_condensed(&p, sk, sv)) return NULL;
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cpu_attend_fwd(&p, err, sizeof err);
    Py_END_ALLOW_THREADS
    return finish(status, err);
}

/* dq (B, L, H, D), dk (B, L, Hkv, D), dv (B, L, Hkv, Dv): the writable gradients of q, k, v
 * (with v_in_k, dv is dk's prefix view).  Shared by the three backward bindings. */
static int grad_views(lca_params *p, int typenum, PyObject *dq, PyObject *dk, PyObject *dv) {
    npy_intp s[4], wq[4] = {p->B, p->L, p->H, p->D}, wk[4] = {p->B, p->L, p->Hkv, p->D};
    npy_intp wv[4] = {p->B, p->L, p->Hkv, p->Dv};
    if (view_of(dq, "dq", 4, typenum, 1, s, &p->dq) || same_shape("dq", s, wq, 4) ||
        view_of(dk, "dk", 4, typenum, 1, s, &p->dk) || same_shape("dk", s, wk, 4) ||
        view_of(dv, "dv", 4, typenum, 1, s, &p->dv) || same_shape("dv", s, wv, 4))
        return -1;
    if (p->v_in_k && !same_view(&p->dv, &p->dk)) {
        PyErr_SetString(PyExc_ValueError, "v_in_k: dv must be a prefix view of dk");
        return -1;
    }
    return 0;
}

/* dkbar, dvbar: the condensed entries' gradients, of shapes wk and wv (writable or not; with
 * v_in_k, dvbar is dkbar's prefix view). */
static int entry_grad_views(const lca_params *p, int typenum, PyObject *dkbar, PyObject *dvbar,
                            const npy_intp *wk, const npy_intp *wv, int writable,
                            lca_view *dkb, lca_view *dvb) {
    npy_intp s[4];
    if (view_of(dkbar, "dkbar", 4, typenum, writable, s, dkb) || same_shape("dkbar", s, wk, 4) ||
        view_of(dvbar, "dvbar", 4, typenum, writable, s, dvb) || same_shape("dvbar", s, wv, 4))
        return -1;
    if (p->v_in_k && !same_view(dvb, dkb)) {
        PyErr_SetString(PyExc_ValueError, "v_in_k: dvbar must be a prefix view of dkbar");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(backward_doc, "backward(dout, q, k, v, out, lse, dq, dk, dv, g, w, n, scale, "
             "rep_bias, d_score, d_pool, v_in_k[, (kbar, vbar)]): SPEC §5 gradients, "
             "accumulated into the zeroed dq, dk, dv; with (kbar, vbar), the forward's "
             "condensation (L // g rows) is not recomputed.");

/* The forward's condensed entries handed to a whole backward: kbar (B, L / g, Hkv, D) and vbar
 * (B, L / g, Hkv, Dv), as condense wrote them (with v_in_k vbar is kbar's prefix view). */
static int handed_entries(lca_params *p, const npy_intp *sk, const npy_intp *sv) {
    const npy_intp m = p->g ? p->L / p->g : 0;
    npy_intp wk[4] = {p->B, m, p->Hkv, p->D}, wv[4] = {p->B, m, p->Hkv, p->Dv};
    if (same_shape("condensed kbar", sk, wk, 4) || same_shape("condensed vbar", sv, wv, 4))
        return -1;
    if (p->v_in_k && !same_view(&p->vbar, &p->kbar)) {
        PyErr_SetString(PyExc_ValueError, "v_in_k: condensed vbar must be a prefix view of kbar");
        return -1;
    }
    return 0;
}

static PyObject *py_backward(PyObject *self, PyObject *args) {
    PyObject *dout, *q, *k, *v, *out, *lse, *dq, *dk, *dv, *given = Py_None;
    lca_params p = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOOOLLLddLLi|O", &dout, &q, &k, &v, &out, &lse, &dq, &dk,
                          &dv, &p.g, &p.w, &p.n, &p.scale, &p.rep_bias, &p.d_score, &p.d_pool,
                          &p.v_in_k, &given))
        return NULL;
    int typenum = qkv_params(&p, q, k, v);
    if (typenum < 0 || lca_params_check(&p) || attend_views(&p, typenum, out, lse, 0))
        return NULL;
    npy_intp s[4], wo[4] = {p.B, p.L, p.H, p.Dv};
    if (view_of(dout, "dout", 4, typenum, 0, s, &p.dout) || same_shape("dout", s, wo, 4) ||
        grad_views(&p, typenum, dq, dk, dv))
        return NULL;
    if (given != Py_None) {
        PyObject *kbar, *vbar;
        npy_intp sk[4], sv[4];
        if (!PyArg_ParseTuple(given, "OO", &kbar, &vbar) ||
            view_of(kbar, "condensed kbar", 4, typenum, 0, sk, &p.kbar) ||
            view_of(vbar, "condensed vbar", 4, typenum, 0, sv, &p.vbar) ||
            handed_entries(&p, sk, sv))
            return NULL;
    }
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cpu_attention_bwd(&p, err, sizeof err);
    Py_END_ALLOW_THREADS
    return finish(status, err);
}

PyDoc_STRVAR(condense_backward_doc, "condense_backward(q, k, v, dkbar, dvbar, dq, dk, dv, g, n, "
             "scale, d_score, d_pool, v_in_k): the condensation's gradients, accumulated into "
             "the zeroed dq, dk, dv.");

static PyObject *py_condense_backward(PyObject *self, PyObject *args) {
    PyObject *q, *k, *v, *dkbar, *dvbar, *dq, *dk, *dv;
    lca_params p = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOOLLdLLi", &q, &k, &v, &dkbar, &dvbar, &dq, &dk, &dv,
                          &p.g, &p.n, &p.scale, &p.d_score, &p.d_pool, &p.v_in_k))
        return NULL;
    int typenum = qkv_params(&p, q, k, v);
    if (typenum < 0 || lca_params_check(&p)) return NULL;
    p.m = p.L / p.g;
    npy_intp wk[4] = {p.B, p.m, p.Hkv, p.D}, wv[4] = {p.B, p.m, p.Hkv, p.Dv};
    lca_view dkb, dvb;
    if (entry_grad_views(&p, typenum, dkbar, dvbar, wk, wv, 0, &dkb, &dvb) ||
        grad_views(&p, typenum, dq, dk, dv))
        return NULL;
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cpu_condense_bwd(&p, &dkb, &dvb, err, sizeof err);
    Py_END_ALLOW_THREADS
    return finish(status, err);
}

PyDoc_STRVAR(attend_backward_doc, "attend_backward(dout, q, k, v, kbar, vbar, out, lse, dq, dk, "
             "dv, dkbar, dvbar, g, w, scale, rep_bias, v_in_k): the gradients of attend, "
             "accumulated into the zeroed dq, dk, dv, dkbar, dvbar.");

static PyObject *py_attend_backward(PyObject *self, PyObject *args) {
    PyObject *dout, *q, *k, *v, *kbar, *vbar, *out, *lse, *dq, *dk, *dv, *dkbar, *dvbar;
    lca_params p = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOLLddi", &dout, &q, &k, &v, &kbar, &vbar, &out,
                          &lse, &dq, &dk, &dv, &dkbar, &dvbar, &p.g, &p.w, &p.scale, &p.rep_bias,
                          &p.v_in_k))
        return NULL;
    int typenum = qkv_params(&p, q, k, v);
    p.n = 1, p.d_score = p.d_pool = p.D;                    /* as attend: no condensation */
    if (typenum < 0 || lca_params_check(&p) || attend_views(&p, typenum, out, lse, 0))
        return NULL;
    npy_intp sk[4], sv[4], s[4];
    if (view_of(kbar, "kbar", 4, typenum, 0, sk, &p.kbar) ||
        view_of(vbar, "vbar", 4, typenum, 0, sv, &p.vbar) || given_condensed(&p, sk, sv))
        return NULL;
    npy_intp wo[4] = {p.B, p.L, p.H, p.Dv};
    lca_view dkb, dvb;
    if (view_of(dout, "dout", 4, typenum, 0, s, &p.dout) || same_shape("dout", s, wo, 4) ||
        grad_views(&p, typenum, dq, dk, dv) ||
        entry_grad_views(&p, typenum, dkbar, dvbar, sk, sv, 1, &dkb, &dvb))
        return NULL;
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cpu_attend_bwd(&p, &dkb, &dvb, err, sizeof err);
    Py_END_ALLOW_THREADS
    return finish(status, err);
}

/* ---------------------------------------------------------------------------------------------
 * Decode (the condensed cache, lca/cache.py).  Arrays are 4-D: q (B, 1, H, D), k (B, 1, Hkv, D),
 * v (B, 1, Hkv, Dv), out (B, 1, H, Dv) for the new token; kbar (B, M, Hkv, D), vbar (B, M, Hkv,
 * Dv), ring kr (B, R, Hkv, D), vr (B, R, Hkv, Dv) and the summary sums qsum (B, S, Hkv, D). */

/* The ring, sum and condensed capacities the step at position T needs (lca.h). */
static int decode_check(lca_decode_params *p) {
    if (p->g < 1 || p->g > INT32_MAX || p->w < 0 || p->w > ((int64_t)1 << 62) || p->n < 1 ||
        p->n > p->g || p->T < 0 || p->T > ((int64_t)1 << 62)) {
        PyErr_SetString(PyExc_ValueError, "group_size, window, n_summary or T out of range");
        return -1;
    }
    if (p->H < 1 || p->Hkv < 1 || p->H % p->Hkv || p->D < 1 || p->Dv < 1) {
        PyErr_SetString(PyExc_ValueError, "q, k, v: heads must be a multiple of kv heads >= 1 "
                        "and widths >= 1");
        return -1;
    }
    if (p->d_score < 1 || p->d_score > p->D || p->d_pool < 0 || p->d_pool > p->D ||
        (p->v_in_k && p->Dv > p->d_pool)) {
        PyErr_SetString(PyExc_ValueError, "d_score or d_pool out of range");
        return -1;
    }
    if (!isfinite(p->scale) || !isfinite(p->rep_bias) ||
        (p->dtype != LCA_F64 && (fabs(p->scale) > FLT_MAX || fabs(p->rep_bias) > FLT_MAX))) {
        PyErr_SetString(PyExc_ValueError, "softmax_scale and rep_bias must be finite (in the "
                        "inputs' precision)");
        return -1;
    }
    const int64_t T = p->T, g = p->g, w = p->w;
    const int64_t ring = w + g - 1 > g ? w + g - 1 : g;
    const int64_t sums = w ? (w + g - 2) / g + 1 : 1;
    const int64_t c1 = lca_cache_condensed(T + 1, g, w), Gt = lca_num_condensed(T, g, w);
    if (p->R < 1 || p->R < (T + 1 < ring ? T + 1 : ring)) {
        PyErr_Format(PyExc_ValueError, "kr: %lld ring slots, the step at %lld needs %lld",
                     (long long)p->R, (long long)T, (long long)(T + 1 < ring ? T + 1 : ring));
        return -1;
    }
    if (p->S < 1 || p->S < (T / g + 1 < sums ? T / g + 1 : sums)) {
        PyErr_Format(PyExc_ValueError, "qsum: %lld sum slots, too few for window %lld",
                     (long long)p->S, (long long)w);
        return -1;
    }
    if (p->M < c1 || p->M < Gt) {
        PyErr_Format(PyExc_ValueError, "kbar: %lld condensed rows, the step at %lld needs %lld",
                     (long long)p->M, (long long)T, (long long)(c1 > Gt ? c1 : Gt));
        return -1;
    }
    return 0;
}

/* Shapes of the nine decode arrays, from q (B, 1, H, D), k (B, 1, Hkv, D), v (B, 1, Hkv, Dv),
 * kbar (M rows), kr (R rows), qsum (S rows); every other shape must agree. */
static int decode_shapes(lca_decode_params *p, npy_intp (*s)[4]) {
    p->B = s[0][0], p->H = s[0][2], p->D = s[0][3], p->Hkv = s[1][2], p->Dv = s[2][3];
    p->M = s[4][1], p->R = s[6][1], p->S = s[8][1];
    const char *names[9] = {"q", "k", "v", "out", "kbar", "vbar", "kr", "vr", "qsum"};
    npy_intp want[9][4] = {
        {p->B, 1, p->H, p->D}, {p->B, 1, p->Hkv, p->D}, {p->B, 1, p->Hkv, p->Dv},
        {p->B, 1, p->H, p->Dv}, {p->B, p->M, p->Hkv, p->D}, {p->B, p->M, p->Hkv, p->Dv},
        {p->B, p->R, p->Hkv, p->D}, {p->B, p->R, p->Hkv, p->Dv}, {p->B, p->S, p->Hkv, p->D}};
    for (int i = 0; i < 9; i++)
        if (same_shape(names[i], s[i], want[i], 4)) return -1;
    if (p->v_in_k && (!same_view(&p->v, &p->k) || !same_view(&p->vbar, &p->kbar) ||
                      !same_view(&p->vr, &p->kr))) {
        PyErr_SetString(PyExc_ValueError, "v_in_k: v, vbar, vr must be prefix views of k, kbar, "
                        "kr");
        return -1;
    }
    return 0;
}

#define DECODE_FORMAT "OOOOOOOOOLLLLddLLi"
#define DECODE_ARGS(p) &q, &k, &v, &out, &kbar, &vbar, &kr, &vr, &qsum, &(p).T, &(p).g, \
    &(p).w, &(p).n, &(p).scale, &(p).rep_bias, &(p).d_score, &(p).d_pool, &(p).v_in_k

PyDoc_STRVAR(decode_step_doc, "decode_step(q, k, v, out, kbar, vbar, kr, vr, qsum, T, g, w, n, "
             "scale, rep_bias, d_score, d_pool, v_in_k): one decode step of the condensed cache "
             "(lca.h lca_decode_params); updates kbar, vbar, kr, vr, qsum, writes out.");

static PyObject *py_decode_step(PyObject *self, PyObject *args) {
    PyObject *q, *k, *v, *out, *kbar, *vbar, *kr, *vr, *qsum;
    lca_decode_params p = {0};
    if (!PyArg_ParseTuple(args, DECODE_FORMAT, DECODE_ARGS(p))) return NULL;
    if (!PyArray_Check(q)) {
        PyErr_SetString(PyExc_TypeError, "q: expected a NumPy array");
        return NULL;
    }
    const int typenum = PyArray_TYPE((PyArrayObject *)q);
    if (typenum != NPY_FLOAT32 && typenum != NPY_FLOAT64) {
        PyErr_SetString(PyExc_TypeError, "q: expected dtype float32 or float64");
        return NULL;
    }
    p.dtype = typenum == NPY_FLOAT32 ? LCA_F32 : LCA_F64;
    npy_intp s[9][4];
    if (view_of(q, "q", 4, typenum, 0, s[0], &p.q) || view_of(k, "k", 4, typenum, 0, s[1], &p.k) ||
        view_of(v, "v", 4, typenum, 0, s[2], &p.v) ||
        view_of(out, "out", 4, typenum, 1, s[3], &p.out) ||
        view_of(kbar, "kbar", 4, typenum, 1, s[4], &p.kbar) ||
        view_of(vbar, "vbar", 4, typenum, 1, s[5], &p.vbar) ||
        view_of(kr, "kr", 4, typenum, 1, s[6], &p.kr) ||
        view_of(vr, "vr", 4, typenum, 1, s[7], &p.vr) ||
        view_of(qsum, "qsum", 4, typenum, 1, s[8], &p.qsum))
        return NULL;
    if (decode_shapes(&p, s) || decode_check(&p)) return NULL;
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cpu_decode_step(&p, err, sizeof err);
    Py_END_ALLOW_THREADS
    return finish(status, err);
}


#ifdef LCA_WITH_CUDA
/* ---------------------------------------------------------------------------------------------
 * CUDA entry points.  Arrays arrive as descriptors (pointer, shape, strides in elements) built
 * by lca/_cuda.py from the caller's framework; nothing here touches the device memory. */

static int desc_of(PyObject *o, const char *name, int ndim, npy_intp *shape, lca_view *v) {
    PyObject *shp, *str;
    unsigned long long ptr;
    if (!PyArg_ParseTuple(o, "KO!O!", &ptr, &PyTuple_Type, &shp, &PyTuple_Type, &str)) {
        PyErr_Format(PyExc_TypeError, "%s: bad device array descriptor", name);
        return -1;
    }
    if (PyTuple_GET_SIZE(shp) != ndim || PyTuple_GET_SIZE(str) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions", name, ndim);
        return -1;
    }
    int64_t st[4] = {0}, size = 1;
    for (int i = 0; i < ndim; i++) {
        shape[i] = (npy_intp)PyLong_AsLongLong(PyTuple_GET_ITEM(shp, i));
        st[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(str, i));
        if (PyErr_Occurred()) return -1;
        size *= shape[i];
    }
    for (int i = 0; i < ndim && size; i++)
        if (st[i] < 0 || (i == ndim - 1 && shape[i] > 1 && st[i] != 1)) {
            PyErr_Format(PyExc_ValueError, "%s: strides must be non-negative with a contiguous "
                         "last dimension", name);
            return -1;
        }
    v->p = (void *)(uintptr_t)ptr;
    v->sb = st[0], v->st = st[1], v->sh = ndim > 2 ? st[2] : 0;
    return 0;
}

static int cuda_qkv(lca_params *p, int dtype, PyObject *q, PyObject *k, PyObject *v) {
    npy_intp sq[4], sk[4], sv[4];
    if (dtype != LCA_F32 && dtype != LCA_BF16 && dtype != LCA_F16) {
        PyErr_SetString(PyExc_TypeError, "q: the CUDA engine takes float32, float16, bfloat16");
        return -1;
    }
    p->dtype = (lca_dtype)dtype;
    if (desc_of(q, "q", 4, sq, &p->q) || desc_of(k, "k", 4, sk, &p->k) ||
        desc_of(v, "v", 4, sv, &p->v))
        return -1;
    if (qkv_sizes(p, sq, sk, sv)) return -1;
    return 0;
}

static PyObject *cuda_finish(int status, const char *err) {
    if (status == LCA_OK) Py_RETURN_NONE;
    PyErr_SetString(status == LCA_ERR_UNSUPPORTED ? PyExc_NotImplementedError : PyExc_RuntimeError,
                    err);
    return NULL;
}

PyDoc_STRVAR(cuda_condense_doc, "cuda_condense(dtype, q, k, v, kbar, vbar, anchor, alpha, g, n, "
             "scale, d_score, d_pool, v_in_k, device, stream): condensation on the GPU.");

static PyObject *py_cuda_condense(PyObject *self, PyObject *args) {
    PyObject *q, *k, *v, *kbar, *vbar, *anchor, *alpha;
    int dtype, device;
    unsigned long long stream;
    lca_params p = {0};
    if (!PyArg_ParseTuple(args, "iOOOOOOOLLdLLiiK", &dtype, &q, &k, &v, &kbar, &vbar, &anchor,
                          &alpha, &p.g, &p.n, &p.scale, &p.d_score, &p.d_pool, &p.v_in_k,
                          &device, &stream))
        return NULL;
    if (cuda_qkv(&p, dtype, q, k, v) || lca_params_check(&p)) return NULL;
    p.m = p.L / p.g;
    npy_intp s[4], wk[4] = {p.B, p.m, p.Hkv, p.D}, wv[4] = {p.B, p.m, p.Hkv, p.Dv};
    npy_intp wa[4] = {p.B, p.m, p.Hkv, p.g};
    if (desc_of(kbar, "kbar", 4, s, &p.kbar) || same_shape("kbar", s, wk, 4) ||
        desc_of(vbar, "vbar", 4, s, &p.vbar) || same_shape("vbar", s, wv, 4) ||
        desc_of(anchor, "anchor", 3, s, &p.anchor) || same_shape("anchor", s, wa, 3) ||
        desc_of(alpha, "alpha", 4, s, &p.alpha) || same_shape("alpha", s, wa, 4))
        return NULL;
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cuda_condense(&p, device, (void *)(uintptr_t)stream, err, sizeof err);
    Py_END_ALLOW_THREADS
    return cuda_finish(status, err);
}

PyDoc_STRVAR(cuda_attend_doc, "cuda_attend(dtype, q, k, v, kbar, vbar, out, lse, g, w, scale, "
             "rep_bias, v_in_k, device, stream): attention forward on the GPU (lse float32).");

static PyObject *py_cuda_attend(PyObject *self, PyObject *args) {
    PyObject *q, *k, *v, *kbar, *vbar, *out, *lse;
    int dtype, device;
    unsigned long long stream;
    lca_params p = {0};
    if (!PyArg_ParseTuple(args, "iOOOOOOOLLddiiK", &dtype, &q, &k, &v, &kbar, &vbar, &out, &lse,
                          &p.g, &p.w, &p.scale, &p.rep_bias, &p.v_in_k, &device, &stream))
        return NULL;
    if (cuda_qkv(&p, dtype, q, k, v)) return NULL;
    p.n = 1, p.d_score = p.d_pool = p.D;
    if (lca_params_check(&p)) return NULL;
    npy_intp sk[4], sv[4], s[4], wo[4] = {p.B, p.L, p.H, p.Dv}, wl[3] = {p.B, p.H, p.L};
    if (desc_of(kbar, "kbar", 4, sk, &p.kbar) || desc_of(vbar, "vbar", 4, sv, &p.vbar) ||
        desc_of(out, "out", 4, s, &p.out) || same_shape("out", s, wo, 4) ||
        desc_of(lse, "lse", 3, s, &p.lse) || same_shape("lse", s, wl, 3))
        return NULL;
    if (given_condensed(&p, sk, sv)) return NULL;
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cuda_attend_fwd(&p, device, (void *)(uintptr_t)stream, err, sizeof err);
    Py_END_ALLOW_THREADS
    return cuda_finish(status, err);
}

PyDoc_STRVAR(cuda_backward_workspace_doc, "cuda_backward_workspace(dtype, B, L, H, Hkv, D, Dv, g, "
             "v_in_k[, m]): bytes of scratch cuda_backward, cuda_condense_backward and (with m, "
             "the given condensed rows) cuda_attend_backward need.");

static PyObject *py_cuda_backward_workspace(PyObject *self, PyObject *args) {
    lca_params p = {0};
    int dtype;
    if (!PyArg_ParseTuple(args, "iLLLLLLLi|L", &dtype, &p.B, &p.L, &p.H, &p.Hkv, &p.D, &p.Dv, &p.g,
                          &p.v_in_k, &p.m))
        return NULL;
    if (p.D > 1024 || p.Dv > 1024) {   /* the same words as the backward itself */
        PyErr_Format(PyExc_NotImplementedError, "attention backward on CUDA: head widths D=%lld, "
                     "Dv=%lld; the CUDA engine supports up to 1024", (long long)p.D,
                     (long long)p.Dv);
        return NULL;
    }
    if (p.B < 0 || p.L < 0 || p.H < 1 || p.Hkv < 1 || p.D < 1 || p.Dv < 1 || p.g < 1 ||
        p.g > INT32_MAX || p.m < 0 ||
        /* the workspace's products stay far from int64 overflow (in double: no wrap here) */
        (double)p.B * (double)(p.L + p.m) * (double)(p.H + p.Hkv) *
                (double)(p.D + p.Dv + p.g + 16) > (double)((int64_t)1 << 56)) {
        PyErr_SetString(PyExc_ValueError, "cuda_backward_workspace: sizes out of range");
        return NULL;
    }
    if (dtype != LCA_F32 && dtype != LCA_BF16 && dtype != LCA_F16) {
        PyErr_SetString(PyExc_TypeError, "cuda_backward_workspace: dtype must be float32, "
                        "float16 or bfloat16");
        return NULL;
    }
    p.dtype = (lca_dtype)dtype;
    return PyLong_FromLongLong(lca_cuda_bwd_workspace(&p));
}

/* out, dout (B, L, H, Dv) and lse (B, H, L) of a CUDA backward call. */
static int cuda_dout_descs(lca_params *p, PyObject *dout, PyObject *out, PyObject *lse) {
    npy_intp s[4], wo[4] = {p->B, p->L, p->H, p->Dv}, wl[3] = {p->B, p->H, p->L};
    if (desc_of(out, "out", 4, s, &p->out) || same_shape("out", s, wo, 4) ||
        desc_of(dout, "dout", 4, s, &p->dout) || same_shape("dout", s, wo, 4) ||
        desc_of(lse, "lse", 3, s, &p->lse) || same_shape("lse", s, wl, 3))
        return -1;
    return 0;
}

/* dq, dk, dv of a CUDA backward call: the shapes of q, k, v (with v_in_k dv is dk's prefix). */
static int cuda_grad_descs(lca_params *p, PyObject *dq, PyObject *dk, PyObject *dv) {
    npy_intp s[4], wq[4] = {p->B, p->L, p->H, p->D}, wk[4] = {p->B, p->L, p->Hkv, p->D};
    npy_intp wv[4] = {p->B, p->L, p->Hkv, p->Dv};
    if (desc_of(dq, "dq", 4, s, &p->dq) || same_shape("dq", s, wq, 4) ||
        desc_of(dk, "dk", 4, s, &p->dk) || same_shape("dk", s, wk, 4) ||
        desc_of(dv, "dv", 4, s, &p->dv) || same_shape("dv", s, wv, 4))
        return -1;
    if (p->v_in_k && !same_view(&p->dv, &p->dk)) {
        PyErr_SetString(PyExc_ValueError, "v_in_k: dv must be a prefix view of dk");
        return -1;
    }
    return 0;
}

/* dkbar, dvbar of shapes wk, wv (with v_in_k dvbar is dkbar's prefix view). */
static int cuda_entry_grad_descs(const lca_params *p, PyObject *dkbar, PyObject *dvbar,
                                 const npy_intp *wk, const npy_intp *wv, lca_view *dkb,
                                 lca_view *dvb) {
    npy_intp s[4];
    if (desc_of(dkbar, "dkbar", 4, s, dkb) || same_shape("dkbar", s, wk, 4) ||
        desc_of(dvbar, "dvbar", 4, s, dvb) || same_shape("dvbar", s, wv, 4))
        return -1;
    if (p->v_in_k && !same_view(dvb, dkb)) {
        PyErr_SetString(PyExc_ValueError, "v_in_k: dvbar must be a prefix view of dkbar");
        return -1;
    }
    return 0;
}

/* A bad workspace is the caller's ValueError; the rest as cuda_finish. */
static PyObject *cuda_bwd_finish(int status, const char *err) {
    if (status == LCA_ERR_ARG) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return cuda_finish(status, err);
}

PyDoc_STRVAR(cuda_backward_doc, "cuda_backward(dtype, dout, q, k, v, out, lse, dq, dk, dv, "
             "(workspace_ptr, workspace_bytes), g, w, n, scale, rep_bias, d_score, d_pool, v_in_k, "
             "device, stream[, (kbar, vbar, anchor, alpha)]): SPEC §5 gradients on the GPU into "
             "dq, dk, dv (lse float32); with the forward's condensation given (anchor int32, "
             "alpha float32, both contiguous), it is not recomputed.");

/* The forward's condensation handed to a CUDA backward (lca.h, lca_cuda_attention_bwd). */
static int cuda_handed(lca_params *p, PyObject *given) {
    PyObject *kbar, *vbar, *anchor, *alpha;
    npy_intp sk[4], sv[4], sa[4], sl[4];
    if (!PyArg_ParseTuple(given, "OOOO", &kbar, &vbar, &anchor, &alpha) ||
        desc_of(kbar, "condensed kbar", 4, sk, &p->kbar) ||
        desc_of(vbar, "condensed vbar", 4, sv, &p->vbar) || handed_entries(p, sk, sv) ||
        desc_of(anchor, "condensed anchor", 3, sa, &p->anchor) ||
        desc_of(alpha, "condensed alpha", 4, sl, &p->alpha))
        return -1;
    const npy_intp m = p->L / p->g;
    npy_intp wa[3] = {p->B, m, p->Hkv}, wl[4] = {p->B, m, p->Hkv, p->g};
    if (same_shape("condensed anchor", sa, wa, 3) || same_shape("condensed alpha", sl, wl, 4))
        return -1;
    const int64_t Hkv = p->Hkv, g = p->g;
    const int dense = (p->B < 2 || p->anchor.sb == m * Hkv) && (m < 2 || p->anchor.st == Hkv) &&
                      (p->B < 2 || p->alpha.sb == m * Hkv * g) &&
                      (m < 2 || p->alpha.st == Hkv * g) && (Hkv < 2 || p->alpha.sh == g);
    if (!dense) {
        PyErr_SetString(PyExc_ValueError, "condensed anchor, alpha: must be contiguous");
        return -1;
    }
    if (!p->alpha.p || !p->anchor.p) {     /* (an empty array's pointer may be NULL) */
        p->alpha.p = p->anchor.p = NULL;
        p->kbar.p = p->vbar.p = NULL;
    }
    return 0;
}

static PyObject *py_cuda_backward(PyObject *self, PyObject *args) {
    PyObject *dout, *q, *k, *v, *out, *lse, *dq, *dk, *dv, *given = Py_None;
    int dtype, device;
    unsigned long long stream, ws_ptr;
    long long ws_bytes;
    lca_params p = {0};
    if (!PyArg_ParseTuple(args, "iOOOOOOOOO(KL)LLLddLLiiK|O", &dtype, &dout, &q, &k, &v, &out,
                          &lse, &dq, &dk, &dv, &ws_ptr, &ws_bytes, &p.g, &p.w, &p.n, &p.scale,
                          &p.rep_bias, &p.d_score, &p.d_pool, &p.v_in_k, &device, &stream,
                          &given))
        return NULL;
    if (cuda_qkv(&p, dtype, q, k, v) || lca_params_check(&p) ||
        cuda_dout_descs(&p, dout, out, lse) || cuda_grad_descs(&p, dq, dk, dv) ||
        (given != Py_None && cuda_handed(&p, given)))
        return NULL;
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cuda_attention_bwd(&p, (void *)(uintptr_t)ws_ptr, (int64_t)ws_bytes, device,
                                    (void *)(uintptr_t)stream, err, sizeof err);
    Py_END_ALLOW_THREADS
    return cuda_bwd_finish(status, err);
}

PyDoc_STRVAR(cuda_attend_backward_doc, "cuda_attend_backward(dtype, dout, q, k, v, kbar, vbar, "
             "out, lse, dq, dk, dv, dkbar, dvbar, (workspace_ptr, workspace_bytes), g, w, scale, "
             "rep_bias, v_in_k, device, stream): the gradients of attend over the given kbar, "
             "vbar on the GPU into dq, dk, dv, dkbar, dvbar (lse float32).");

static PyObject *py_cuda_attend_backward(PyObject *self, PyObject *args) {
    PyObject *dout, *q, *k, *v, *kbar, *vbar, *out, *lse, *dq, *dk, *dv, *dkbar, *dvbar;
    int dtype, device;
    unsigned long long stream, ws_ptr;
    long long ws_bytes;
    lca_params p = {0};
    if (!PyArg_ParseTuple(args, "iOOOOOOOOOOOOO(KL)LLddiiK", &dtype, &dout, &q, &k, &v, &kbar,
                          &vbar, &out, &lse, &dq, &dk, &dv, &dkbar, &dvbar, &ws_ptr, &ws_bytes,
                          &p.g, &p.w, &p.scale, &p.rep_bias, &p.v_in_k, &device, &stream))
        return NULL;
    if (cuda_qkv(&p, dtype, q, k, v)) return NULL;
    p.n = 1, p.d_score = p.d_pool = p.D;                    /* as attend: no condensation */
    npy_intp sk[4], sv[4];
    lca_view dkb, dvb;
    if (lca_params_check(&p) || cuda_dout_descs(&p, dout, out, lse) ||
        cuda_grad_descs(&p, dq, dk, dv) || desc_of(kbar, "kbar", 4, sk, &p.kbar) ||
        desc_of(vbar, "vbar", 4, sv, &p.vbar) || given_condensed(&p, sk, sv) ||
        cuda_entry_grad_descs(&p, dkbar, dvbar, sk, sv, &dkb, &dvb))
        return NULL;
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cuda_attend_bwd(&p, &dkb, &dvb, (void *)(uintptr_t)ws_ptr, (int64_t)ws_bytes,
                                 device, (void *)(uintptr_t)stream, err, sizeof err);
    Py_END_ALLOW_THREADS
    return cuda_bwd_finish(status, err);
}

PyDoc_STRVAR(cuda_condense_backward_doc, "cuda_condense_backward(dtype, q, k, v, dkbar, dvbar, dq, "
             "dk, dv, (workspace_ptr, workspace_bytes), g, n, scale, d_score, d_pool, v_in_k, "
             "device, stream): the condensation's backward alone on the GPU, given dkbar, dvbar "
             "(L / g rows), into dq, dk, dv.");

static PyObject *py_cuda_condense_backward(PyObject *self, PyObject *args) {
    PyObject *q, *k, *v, *dkbar, *dvbar, *dq, *dk, *dv;
    int dtype, device;
    unsigned long long stream, ws_ptr;
    long long ws_bytes;
    lca_params p = {0};
    if (!PyArg_ParseTuple(args, "iOOOOOOOO(KL)LLdLLiiK", &dtype, &q, &k, &v, &dkbar, &dvbar, &dq,
                          &dk, &dv, &ws_ptr, &ws_bytes, &p.g, &p.n, &p.scale, &p.d_score,
                          &p.d_pool, &p.v_in_k, &device, &stream))
        return NULL;
    if (cuda_qkv(&p, dtype, q, k, v) || lca_params_check(&p)) return NULL;
    p.m = p.L / p.g;
    npy_intp wk[4] = {p.B, p.m, p.Hkv, p.D}, wv[4] = {p.B, p.m, p.Hkv, p.Dv};
    lca_view dkb, dvb;
    if (cuda_grad_descs(&p, dq, dk, dv) ||
        cuda_entry_grad_descs(&p, dkbar, dvbar, wk, wv, &dkb, &dvb))
        return NULL;
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cuda_condense_bwd(&p, &dkb, &dvb, (void *)(uintptr_t)ws_ptr, (int64_t)ws_bytes,
                                   device, (void *)(uintptr_t)stream, err, sizeof err);
    Py_END_ALLOW_THREADS
    return cuda_bwd_finish(status, err);
}

PyDoc_STRVAR(cuda_decode_step_doc, "cuda_decode_step(dtype, q, k, v, out, kbar, vbar, kr, vr, "
             "qsum, T, g, w, n, scale, rep_bias, d_score, d_pool, v_in_k, work, nsplit_max, "
             "device, stream): decode_step on the GPU (qsum float32; work: the split-softmax "
             "partials, nsplit_max * B * H * (Dv + 2) float32, then B * H arrival counters, "
             "zero before the first step).");

static PyObject *py_cuda_decode_step(PyObject *self, PyObject *args) {
    PyObject *q, *k, *v, *out, *kbar, *vbar, *kr, *vr, *qsum, *work;
    lca_decode_params p = {0};
    int dtype, device;
    unsigned long long stream;
    if (!PyArg_ParseTuple(args, "i" DECODE_FORMAT "OLiK", &dtype, DECODE_ARGS(p), &work,
                          &p.nsplit_max, &device, &stream))
        return NULL;
    if (dtype != LCA_F32 && dtype != LCA_BF16 && dtype != LCA_F16) {
        PyErr_SetString(PyExc_TypeError, "q: the CUDA engine takes float32, float16, bfloat16");
        return NULL;
    }
    p.dtype = (lca_dtype)dtype;
    npy_intp s[9][4], sw[4];
    lca_view wv;
    if (desc_of(q, "q", 4, s[0], &p.q) || desc_of(k, "k", 4, s[1], &p.k) ||
        desc_of(v, "v", 4, s[2], &p.v) || desc_of(out, "out", 4, s[3], &p.out) ||
        desc_of(kbar, "kbar", 4, s[4], &p.kbar) || desc_of(vbar, "vbar", 4, s[5], &p.vbar) ||
        desc_of(kr, "kr", 4, s[6], &p.kr) || desc_of(vr, "vr", 4, s[7], &p.vr) ||
        desc_of(qsum, "qsum", 4, s[8], &p.qsum) || desc_of(work, "work", 1, sw, &wv))
        return NULL;
    if (decode_shapes(&p, s) || decode_check(&p)) return NULL;
    /* in double: with direct misuse (fake shapes) the product could wrap in int64 */
    if (p.nsplit_max < 1 || p.nsplit_max > 65535 ||
        (double)sw[0] < (double)p.B * (double)p.H * ((double)p.nsplit_max * (p.Dv + 2) + 1)) {
        PyErr_SetString(PyExc_ValueError, "work: smaller than B * H * (nsplit_max * (Dv + 2) + "
                        "1), or nsplit_max outside [1, 65535]");
        return NULL;
    }
    p.work = wv.p;
    char err[256] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lca_cuda_decode_step(&p, device, (void *)(uintptr_t)stream, err, sizeof err);
    Py_END_ALLOW_THREADS
    return cuda_finish(status, err);
}

static PyObject *py_cuda_device_count(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(lca_cuda_device_count());
}

static PyObject *py_cuda_last_attend_kernel(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(lca_cuda_last_attend_kernel());
}

static PyObject *py_cuda_last_bwd_dq_kernel(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(lca_cuda_last_bwd_dq_kernel());
}

static PyObject *py_cuda_last_bwd_folded(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(lca_cuda_last_bwd_folded());
}

static PyObject *py_cuda_last_decode_kernel(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(lca_cuda_last_decode_kernel());
}
#endif /* LCA_WITH_CUDA */

static PyObject *py_max_threads(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(lca_cpu_max_threads());
}

static PyMethodDef methods[] = {
    {"condense", py_condense, METH_VARARGS, condense_doc},
    {"attend", py_attend, METH_VARARGS, attend_doc},
    {"backward", py_backward, METH_VARARGS, backward_doc},
    {"attend_backward", py_attend_backward, METH_VARARGS, attend_backward_doc},
    {"condense_backward", py_condense_backward, METH_VARARGS, condense_backward_doc},
    {"decode_step", py_decode_step, METH_VARARGS, decode_step_doc},
    {"max_threads", py_max_threads, METH_NOARGS, "Threads the CPU engine uses by default."},
#ifdef LCA_WITH_CUDA
    {"cuda_condense", py_cuda_condense, METH_VARARGS, cuda_condense_doc},
    {"cuda_attend", py_cuda_attend, METH_VARARGS, cuda_attend_doc},
    {"cuda_backward", py_cuda_backward, METH_VARARGS, cuda_backward_doc},
    {"cuda_attend_backward", py_cuda_attend_backward, METH_VARARGS, cuda_attend_backward_doc},
    {"cuda_condense_backward", py_cuda_condense_backward, METH_VARARGS,
     cuda_condense_backward_doc},
    {"cuda_backward_workspace", py_cuda_backward_workspace, METH_VARARGS,
     cuda_backward_workspace_doc},
    {"cuda_decode_step", py_cuda_decode_step, METH_VARARGS, cuda_decode_step_doc},
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS, "CUDA devices visible (0: none)."},
    {"cuda_last_attend_kernel", py_cuda_last_attend_kernel, METH_NOARGS,
     "The kernel the last cuda_attend launched: 'mla_wgmma', 'gqa_wgmma', 'mla', 'wide', 'mma' or "
     "'simt' ('' before any)."},
    {"cuda_last_bwd_dq_kernel", py_cuda_last_bwd_dq_kernel, METH_NOARGS,
     "The dq kernel the last CUDA backward launched: 'wgmma', 'mma' or 'simt' ('' before any)."},
    {"cuda_last_bwd_folded", py_cuda_last_bwd_folded, METH_NOARGS,
     "What the last CUDA backward's Hopper kernels wrote in final form (their folded "
     "epilogues): 1 the exact keys' dk, dv | 2 dq; 0 none."},
    {"cuda_last_decode_kernel", py_cuda_last_decode_kernel, METH_NOARGS,
     "The partial kernel the last cuda_decode_step launched: 'bulk', 'mma' or 'simt' ('' before "
     "any)."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "lca._C",
                                    "lca's C engine (see lca/__init__.py for the API).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    return PyModule_Create(&module);
}
