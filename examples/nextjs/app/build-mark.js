"use client";

import { useEffect } from "react";
import { BUILD_LABEL } from "../lib/build";

// Marks the document once React has hydrated it, with the build of the JavaScript that did:
// a page whose HTML and scripts come from two builds, or whose scripts never ran, shows it.
export function BuildMark() {
  useEffect(() => {
    document.documentElement.dataset.hydrated = BUILD_LABEL;
  }, []);
  return null;
}
