import { NextResponse } from "next/server";

export function middleware(request) {
  return NextResponse.redirect(new URL("/isr/one", request.url));
}

export const config = { matcher: ["/old"] };
