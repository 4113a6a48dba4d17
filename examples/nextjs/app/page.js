import Link from "next/link";

export default function Home() {
  return (
    <main>
      <h1>isrgate example</h1>
      <ul>
        <li><Link href="/isr/one">ISR one</Link></li>
        <li><Link href="/isr/two">ISR two</Link></li>
        <li><Link href="/tagged/1">Tagged product 1</Link></li>
        <li><Link href="/dynamic">Dynamic</Link></li>
      </ul>
    </main>
  );
}
