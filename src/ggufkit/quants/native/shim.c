/* The C side of ggufkit's native kernel library: gk_run, and the few numba runtime symbols the kernels'
   object code needs (native/build.py explains each). build.py replaces @KERNEL@ with the kernels' cfunc
   symbol and links this file with their object code into kernels-<key>.so. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern int64_t gk_kernel(int64_t, int64_t, void *, int64_t, int64_t, void *, int64_t, void *)
    __asm__("@KERNEL@");

/* Everything here but gk_run is hidden: the kernels bind to these definitions when linked, never to
   same-named symbols of a numba loaded in the same process. */
#define GK_LOCAL __attribute__((visibility("hidden")))

static __thread int gk_failed;

typedef void (*gk_dtor)(void *data, size_t size, void *info);
typedef struct {
    size_t refct; gk_dtor dtor; void *dtor_info; void *data; size_t size; void *allocator;
} gk_meminfo;

static void gk_free_data(void *data, size_t size, void *info) { (void)data; (void)size; (void)info; }

GK_LOCAL gk_meminfo *NRT_MemInfo_alloc_aligned(size_t size, unsigned align) {
    if (align < 16) align = 16;
    char *base = malloc(sizeof(gk_meminfo) + size + align);
    if (!base) { gk_failed = 1; return NULL; }
    gk_meminfo *mi = (gk_meminfo *)base;
    uintptr_t p = (uintptr_t)(base + sizeof(gk_meminfo));
    p = (p + align - 1) / align * align;
    mi->refct = 1; mi->dtor = gk_free_data; mi->dtor_info = NULL;
    mi->data = (void *)p; mi->size = size; mi->allocator = NULL;
    return mi;
}
GK_LOCAL gk_meminfo *NRT_MemInfo_alloc_safe_aligned(size_t size, unsigned align) {
    return NRT_MemInfo_alloc_aligned(size, align);
}
GK_LOCAL void NRT_MemInfo_call_dtor(gk_meminfo *mi) {
    if (mi->dtor) mi->dtor(mi->data, mi->size, mi->dtor_info);
    free(mi);
}
GK_LOCAL void *NRT_Allocate(size_t size) { void *p = malloc(size); if (!p) gk_failed = 1; return p; }
GK_LOCAL void NRT_Free(void *ptr) { free(ptr); }

GK_LOCAL float numba_frexpf(float x, int *exp) {
    if (isnan(x) || isinf(x) || x == 0.0f) { *exp = 0; return x; }
    return frexpf(x, exp);
}

/* Strides of a no-copy reshape to C order: possible when the old array, without its unit axes, is
   uniformly strided (each stride = next stride * next dim). Returns 1 and fills newstrides, else 0. */
GK_LOCAL int numba_attempt_nocopy_reshape(intptr_t nd, const intptr_t *dims, const intptr_t *strides,
                                 intptr_t newnd, const intptr_t *newdims, intptr_t *newstrides,
                                 intptr_t itemsize, int is_f_order) {
    intptr_t n_old = 1, n_new = 1, inner = itemsize, prev = -1, i;
    for (i = 0; i < nd; i++) n_old *= dims[i];
    for (i = 0; i < newnd; i++) n_new *= newdims[i];
    if (n_old != n_new || is_f_order) return 0;
    if (n_old == 0) { for (i = 0; i < newnd; i++) newstrides[i] = itemsize; return 1; }
    for (i = nd - 1; i >= 0; i--) {
        if (dims[i] == 1) continue;
        if (prev < 0) inner = strides[i];
        else if (strides[i] != strides[prev] * dims[prev]) return 0;
        prev = i;
    }
    for (i = newnd - 1; i >= 0; i--) { newstrides[i] = inner; inner *= newdims[i]; }
    return 1;
}

/* Error paths: take the GIL as numba would, remember the failure, raise nothing. */
extern int PyGILState_Ensure(void);
extern void PyGILState_Release(int);
GK_LOCAL void numba_gil_ensure(int *state) { gk_failed = 1; *state = PyGILState_Ensure(); }
GK_LOCAL void numba_gil_release(int *state) { PyGILState_Release(*state); }
GK_LOCAL int numba_do_raise(void *exc) { (void)exc; gk_failed = 1; return 0; }
GK_LOCAL void *numba_unpickle(const char *data, int n, const char *hashed) {
    (void)data; (void)n; (void)hashed; gk_failed = 1; return NULL;
}
GK_LOCAL void *numba_runtime_build_excinfo_struct(void *gv, void *args) {
    (void)gv; (void)args; gk_failed = 1; return NULL;
}

int64_t gk_run(int64_t op, int64_t t, void *src, int64_t n_rows, int64_t n_per_row, void *qw, int64_t has_qw,
               void *dst) {
    gk_failed = 0;
    int64_t r = gk_kernel(op, t, src, n_rows, n_per_row, qw, has_qw, dst);
    return gk_failed ? -1 : r;
}
