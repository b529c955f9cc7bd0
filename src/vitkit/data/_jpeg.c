/* A JPEG's region, decoded alone: libjpeg's jpeg_crop_scanline and jpeg_skip_scanlines.
 *
 * Pillow decodes a JPEG whole; a random-resized crop keeps a part of it. Here the columns
 * outside the region are never inverse-transformed or colour-converted, the rows above it
 * are entropy-decoded only, and decoding stops after its last row. Used by
 * vitkit.data.preprocess for training crops; anything unusual (CMYK, a warning about the
 * data) is left to Pillow by raising, so that what is read here is what Pillow would read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} Errors;

static void on_error(j_common_ptr cinfo) {
    Errors *errors = (Errors *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, errors->message);
    longjmp(errors->jump, 1);
}

/* Warnings (level -1: corrupt or truncated data) end decoding too: Pillow decides then. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) on_error(cinfo);
}

/* decode_region(data, denom, x, y, width, height) -> (pixels, width, height, channels, x)
 *
 * The region of the image decoded at scale 1/denom (1, 2, 4 or 8), in scaled pixels.
 * Columns are widened to whole blocks: the returned x and width say which were decoded.
 */
static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data;
    int denom, x, y, width, height;
    if (!PyArg_ParseTuple(args, "y*iiiii", &data, &denom, &x, &y, &width, &height)) return NULL;
    if (denom != 1 && denom != 2 && denom != 4 && denom != 8) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "denom must be 1, 2, 4 or 8");
        return NULL;
    }
    struct jpeg_decompress_struct cinfo;
    Errors errors;
    unsigned char *volatile pixels = NULL;
    PyObject *result = NULL;
    cinfo.err = jpeg_std_error(&errors.pub);
    errors.pub.error_exit = on_error;
    errors.pub.emit_message = on_message;
    jpeg_create_decompress(&cinfo);
    if (setjmp(errors.jump)) {
        jpeg_destroy_decompress(&cinfo);
        free(pixels);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, errors.message);
        return NULL;
    }
    jpeg_mem_src(&cinfo, data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_GRAYSCALE && cinfo.jpeg_color_space != JCS_YCbCr &&
        cinfo.jpeg_color_space != JCS_RGB) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "not a grey, YCbCr or RGB JPEG");
        return NULL;
    }
    cinfo.out_color_space = cinfo.num_components == 1 ? JCS_GRAYSCALE : JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    jpeg_start_decompress(&cinfo);
    if (x < 0 || y < 0 || width < 1 || height < 1 || (JDIMENSION)x + width > cinfo.output_width ||
        (JDIMENSION)y + height > cinfo.output_height) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "the region is not inside the image");
        return NULL;
    }
    JDIMENSION left = x, columns = width;
    if (columns < cinfo.output_width) jpeg_crop_scanline(&cinfo, &left, &columns);
    int channels = cinfo.output_components;
    size_t stride = (size_t)columns * channels;
    pixels = malloc(stride * height);
    if (pixels == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    if (y > 0 && jpeg_skip_scanlines(&cinfo, y) != (JDIMENSION)y) {
        strcpy(errors.message, "the data ends before the region");
        longjmp(errors.jump, 1);
    }
    for (int row = 0; row < height; row++) {
        JSAMPROW line = pixels + row * stride;
        if (jpeg_read_scanlines(&cinfo, &line, 1) != 1) {
            strcpy(errors.message, "the data ends inside the region");
            longjmp(errors.jump, 1);
        }
    }
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    result = Py_BuildValue(
        "(y#iiii)", pixels, (Py_ssize_t)(stride * height), (int)columns, height, channels,
        (int)left);
    free(pixels);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS, "A JPEG's region at a reduced scale."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&module); }
