import { BuildMark } from "./build-mark";
import { BUILD_LABEL } from "../lib/build";

export const metadata = { title: "isrgate example" };

export default function RootLayout({ children }) {
  return (
    <html lang="en">
      <body>
        {children}
        <footer id="build" data-build={BUILD_LABEL}>
          build {BUILD_LABEL}
        </footer>
        <BuildMark />
      </body>
    </html>
  );
}
