/* errors.c: filling the caller's ada_error (the error contract in adaloss.h). */
#include "adaloss.h"

#include <stdarg.h>
#include <stdio.h>

ada_status ada_fail(ada_error *err, ada_status status, const char *format, ...)
{
    if (err) {
        va_list args;
        va_start(args, format);
        vsnprintf(err->msg, sizeof err->msg, format, args);
        va_end(args);
    }
    return status;
}
